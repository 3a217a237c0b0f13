//! Log capture: every test in a binary logs into one buffer, at DEBUG for every crate (reqwest
//! and hyper included), so tests can assert that no secret they saw shows up there.

use std::sync::{Arc, Mutex, OnceLock};

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Install the capturing subscriber for this test binary (once).
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .init();
        buffer
    });
}

/// Everything logged so far by any test of this binary.
pub fn logs() -> String {
    let buffer = LOGS.get().expect("capture_logs() first");
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}
