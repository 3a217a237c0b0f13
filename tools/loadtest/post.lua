-- wrk script: POST the agent chat request, then print one machine-readable summary line.
-- LOADTEST_BODY names the body file (default: tools/loadtest/agent-request.json, relative to the
-- repository root).
local path = os.getenv("LOADTEST_BODY") or "tools/loadtest/agent-request.json"
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer client-supplied-token"

-- LOADTEST_DELAY_MS > 0: each connection pauses before its next request, like an agent thinking
-- between calls: exponentially distributed with this mean, so that connections do not fall into
-- step and arrive in bursts. Defined only then: a delay() function costs wrk a timer per request.
local pause = tonumber(os.getenv("LOADTEST_DELAY_MS") or "0")
if pause > 0 then
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  function delay()
    return math.floor(-pause * math.log(1 - math.random()))
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status))
end
