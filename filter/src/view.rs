//! Reading a request without building a [`serde_json::Value`], to tell which parts need a change.
//!
//! Most of a request an agent sends needs no change, and building a `Value` for it (a map and an
//! owned string per key) costs several times a scan. This module splits a request into its
//! members as raw JSON text, and reads `messages`, `system` and `tools` into borrowed views that
//! keep only what the rules look at. It then asks of them the questions the rules in
//! [`super::request`] and [`super::schema`] ask. It answers *clean* only when the rules would
//! change nothing; any other answer, including a part the view cannot read, sends that part
//! through the rules. So a view may be cautious (some clean parts go through the rules), but
//! never optimistic.
//!
//! Where a key appears twice, a `Value` keeps the last; the view refuses duplicates of the keys
//! it reads (serde's derive does so for struct fields) so that the two never disagree.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::response::ToolContext;
use super::schema::REMOVED_KEYWORDS;

mod scan;

/// The members of a request object in order, each value as raw JSON text. `None` for anything
/// that is not a JSON object, and for an object that gives a key twice (a `Value` keeps the
/// last, and only the full path reproduces that).
pub(crate) fn members(body: &[u8]) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    // `Members` reads a map only, so anything else is an error here.
    serde_json::from_slice::<Members<'_>>(body)
        .ok()
        .map(|members| members.0)
}

/// How the rules treat one message of a `messages` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Left as it is, and not an assistant message: later messages never look at it.
    Plain,
    /// An assistant message the rules leave as it is; later tool results are checked against it.
    CleanAssistant,
    /// The rules may change or drop it.
    Dirty,
}

/// A request's `messages`, read message by message.
pub(crate) enum Messages<'a> {
    /// Not a list: the rules leave it alone.
    NotAList,
    /// A list the view cannot read; only the rules can tell.
    Unreadable,
    /// Each message's raw JSON text and verdict.
    List(Vec<(&'a str, Verdict)>),
}

impl Messages<'_> {
    /// Whether the rules leave every message as it is.
    #[cfg(test)]
    pub(crate) fn is_clean(&self) -> bool {
        match self {
            Messages::NotAList => true,
            Messages::Unreadable => false,
            Messages::List(list) => list.iter().all(|(_, verdict)| *verdict != Verdict::Dirty),
        }
    }
}

/// Reads a request's `messages` message by message.
///
/// A message is judged against the nearest earlier assistant message, as the rules do. That
/// holds even when earlier messages are dirty: the rules only drop an assistant message that
/// made no tool calls, which answers nothing, so a result judged against it is judged dirty.
pub(crate) fn messages(raw: &RawValue) -> Messages<'_> {
    if !raw.get().starts_with('[') {
        return Messages::NotAList;
    }
    let Some(scanned) = scan::messages(raw.get()) else {
        return Messages::Unreadable;
    };
    // A message the view cannot read (a key given twice, say) might be an assistant message
    // that later ones are judged against: then only the rules can tell.
    let Ok(list) = scanned
        .into_iter()
        .map(|(raw, view)| match view {
            Some(view) => Ok((raw, view)),
            None => serde_json::from_str::<Obj<Message<'_>>>(raw).map(|view| (raw, view)),
        })
        .collect::<Result<Vec<_>, _>>()
    else {
        return Messages::Unreadable;
    };
    let mut preceding: Option<&Message<'_>> = None;
    let verdicts = list.iter().map(|(raw, view)| {
        let verdict = match view {
            Obj::Map(message) => {
                let assistant = message.role.as_str() == Some("assistant");
                let clean = message_is_clean(message, preceding);
                if assistant {
                    preceding = Some(message);
                }
                match (clean, assistant) {
                    (false, _) => Verdict::Dirty,
                    (true, true) => Verdict::CleanAssistant,
                    (true, false) => Verdict::Plain,
                }
            }
            _ => Verdict::Plain,
        };
        (*raw, verdict)
    });
    Messages::List(verdicts.collect())
}

/// The elements of a JSON array as raw text, in order; `None` when `text` is not an array.
///
/// A structural scan that only follows strings and nesting: `text` is JSON that serde_json has
/// already checked, so checking it again while taking it apart (as parsing it into a
/// `Vec<&RawValue>` would) is a second full pass over the body for nothing.
pub(crate) fn elements(text: &str) -> Option<Vec<&str>> {
    scan::elements(text)
}

/// Whether `raw` is a string with more than whitespace in it: the rules never change such a
/// `text` or `content`, nor judge it by more than that.
pub(crate) fn is_text(raw: &str) -> bool {
    let written = raw
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'));
    match written.map(scan::blank) {
        None => false,
        Some(Some(blank)) => !blank,
        Some(None) => matches!(
            serde_json::from_str::<Shape<IgnoredAny>>(raw),
            Ok(Shape::Text)
        ),
    }
}

/// The members of the object `raw` (JSON serde_json has checked, part of a body [`members`]
/// read) in order, keys unescaped and values as raw text, without checking it again; `None`
/// for anything that is not an object and for an object that gives a key twice.
pub(crate) fn checked_members(raw: &str) -> Option<Vec<(Cow<'_, str>, &str)>> {
    let split = scan::object_members(raw)?;
    let mut members: Vec<(Cow<'_, str>, &str)> = Vec::with_capacity(split.len());
    for (quoted, value) in split {
        let key = match quoted.get(1..quoted.len() - 1) {
            Some(written) if !written.contains('\\') => Cow::Borrowed(written),
            _ => Cow::Owned(serde_json::from_str::<String>(quoted).ok()?),
        };
        push_new_key(&mut members, key, value)?;
    }
    Some(members)
}

/// Adds a member, or gives `None` when its key was given already: a `Value` keeps the last of
/// a key given twice, and only the full path reproduces that.
fn push_new_key<'a, V>(
    members: &mut Vec<(Cow<'a, str>, V)>,
    key: Cow<'a, str>,
    value: V,
) -> Option<()> {
    if members.iter().any(|(seen, _)| *seen == key) {
        return None;
    }
    members.push((key, value));
    Some(())
}

/// Whether the rules would leave a request's `system` as it is.
pub(crate) fn system_is_clean(raw: &RawValue) -> bool {
    match serde_json::from_str::<Shape<Vec<Obj<Block<'_>>>>>(raw.get()) {
        Ok(Shape::List(blocks)) => !blocks.iter().any(Obj::is_empty_text_block),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Whether the rules would leave a request's `tools` as they are, and the tool names they
/// declare. `None` when the view cannot read them.
pub(crate) fn tools(raw: &RawValue) -> Option<(bool, ToolContext)> {
    let Shape::List(tools) = serde_json::from_str::<Shape<Vec<Obj<Tool<'_>>>>>(raw.get()).ok()?
    else {
        return Some((true, ToolContext::default()));
    };
    let clean = !tools.iter().any(|tool| match tool {
        Obj::Map(tool) => {
            tool.input_schema.dirty
                || tool.parameters.dirty
                || matches!(&tool.function, Obj::Map(f) if f.parameters.dirty)
        }
        _ => false,
    });
    // The same names as `ToolContext::from_request`.
    let names = ToolContext::new(tools.iter().filter_map(|tool| {
        let Obj::Map(tool) = tool else {
            return None;
        };
        let name = match &tool.function {
            Obj::Map(function) if !matches!(function.name, Str::Absent) => &function.name,
            _ => &tool.name,
        };
        name.as_str()
    }));
    Some((clean, names))
}

/// The tools a request declares, if one pass of the rules would change nothing in it.
#[cfg(test)]
pub(crate) fn clean_request(body: &[u8]) -> Option<ToolContext> {
    let mut declared = ToolContext::default();
    for (key, raw) in members(body)? {
        let clean = match &*key {
            "messages" => messages(raw).is_clean(),
            "system" => system_is_clean(raw),
            "tools" => {
                let (clean, names) = tools(raw)?;
                declared = names;
                clean
            }
            _ => true,
        };
        if !clean {
            return None;
        }
    }
    Some(declared)
}

struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
                while let Some(key) = map.next_key::<Str<'de>>()? {
                    let Str::Text(key) = key else {
                        return Err(de::Error::custom("key is not a string"));
                    };
                    push_new_key(&mut members, key, map.next_value()?)
                        .ok_or_else(|| de::Error::custom("duplicate key"))?;
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor)
    }
}

#[derive(Default, Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Message<'a> {
    #[serde(default, borrow)]
    role: Str<'a>,
    #[serde(default, borrow)]
    tool_call_id: Str<'a>,
    #[serde(default, borrow)]
    content: Shape<Vec<Obj<Block<'a>>>>,
    #[serde(default, borrow)]
    tool_calls: Shape<Vec<Obj<Call<'a>>>>,
    #[serde(default)]
    function_call: Obj<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Block<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default)]
    text: Shape<IgnoredAny>,
    #[serde(default, borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    tool_use_id: Str<'a>,
    #[serde(default, borrow)]
    content: Shape<Vec<Obj<Block<'a>>>>,
}

#[derive(Default, Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Call<'a> {
    #[serde(default, borrow)]
    id: Str<'a>,
}

#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(default, borrow)]
    function: Obj<Function<'a>>,
    #[serde(default, borrow)]
    name: Str<'a>,
    // Both are read whichever shape the tool has: a keyword in a schema the rules would not
    // look at only sends the request down the full path.
    #[serde(default)]
    input_schema: Schema,
    #[serde(default)]
    parameters: Schema,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(default, borrow)]
    name: Str<'a>,
    #[serde(default)]
    parameters: Schema,
}

/// Whether the message rules leave this message as it is, judged against the nearest earlier
/// assistant message.
fn message_is_clean(message: &Message<'_>, preceding: Option<&Message<'_>>) -> bool {
    if let Some("tool" | "function") = message.role.as_str() {
        return message
            .tool_call_id
            .as_str()
            .is_none_or(|id| answers(preceding, id));
    }
    if let Shape::List(blocks) = &message.content
        && !blocks_are_clean(blocks, preceding)
    {
        return false;
    }
    if message.content.is_empty_content() {
        let has_calls = matches!(&message.tool_calls, Shape::List(calls) if !calls.is_empty())
            || matches!(message.function_call, Obj::Map(_));
        // Dropped, or its empty content becomes null.
        return has_calls && matches!(message.content, Shape::Absent | Shape::Null);
    }
    true
}

fn blocks_are_clean(blocks: &[Obj<Block<'_>>], preceding: Option<&Message<'_>>) -> bool {
    blocks.iter().all(|block| {
        let Obj::Map(block) = block else {
            return true;
        };
        match block.kind.as_str() {
            Some("text") => !block.text.is_empty_text(),
            Some("tool_result") => {
                let answered = block
                    .tool_use_id
                    .as_str()
                    .is_none_or(|id| answers(preceding, id));
                let inner_clean = match &block.content {
                    Shape::List(inner) => !inner.iter().any(Obj::is_empty_text_block),
                    _ => true,
                };
                answered && inner_clean
            }
            _ => true,
        }
    })
}

/// Whether the assistant message `preceding` made the tool call with this id.
fn answers(preceding: Option<&Message<'_>>, id: &str) -> bool {
    let Some(assistant) = preceding else {
        return false;
    };
    let in_calls = match &assistant.tool_calls {
        Shape::List(calls) => calls
            .iter()
            .any(|call| matches!(call, Obj::Map(call) if call.id.as_str() == Some(id))),
        _ => false,
    };
    in_calls
        || match &assistant.content {
            Shape::List(blocks) => blocks.iter().any(|block| {
                matches!(block, Obj::Map(block)
                    if block.kind.as_str() == Some("tool_use") && block.id.as_str() == Some(id))
            }),
            _ => false,
        }
}

impl Obj<Block<'_>> {
    fn is_empty_text_block(&self) -> bool {
        matches!(self, Obj::Map(block) if block.kind.as_str() == Some("text") && block.text.is_empty_text())
    }
}

/// For a visitor that takes any JSON value: what it expects, and what `null` and a boolean or
/// number (which the rules never look into) become. Strings, lists and objects are its own.
macro_rules! visit_any_scalars {
    (null => $null:expr, other => $other:expr) => {
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($null)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($null)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

/// A value of which the rules only need the kind; strings are reduced to whether they are blank,
/// so long ones are never copied.
#[derive(Default)]
#[cfg_attr(test, derive(Debug, PartialEq))]
enum Shape<T> {
    #[default]
    Absent,
    Null,
    Blank,
    Text,
    List(T),
    Other,
}

impl<T> Shape<T> {
    /// `is_empty_text` of the request rules, for a block's `text`.
    fn is_empty_text(&self) -> bool {
        matches!(self, Shape::Absent | Shape::Null | Shape::Blank)
    }
}

impl<T> Shape<Vec<T>> {
    /// `content_is_empty` of the request rules, for a message's `content`.
    fn is_empty_content(&self) -> bool {
        match self {
            Shape::Absent | Shape::Null | Shape::Blank => true,
            Shape::List(items) => items.is_empty(),
            Shape::Text | Shape::Other => false,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shape<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ShapeVisitor<T> {
            type Value = Shape<T>;

            visit_any_scalars!(null => Shape::Null, other => Shape::Other);

            fn visit_str<E>(self, text: &str) -> Result<Shape<T>, E> {
                Ok(if text.trim().is_empty() {
                    Shape::Blank
                } else {
                    Shape::Text
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shape<T>, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq)).map(Shape::List)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shape<T>, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Shape::Other)
            }
        }

        deserializer.deserialize_any(ShapeVisitor(PhantomData))
    }
}

/// A value read further only when it is an object.
#[derive(Default)]
#[cfg_attr(test, derive(Debug, PartialEq))]
pub(crate) enum Obj<T> {
    #[default]
    Absent,
    Map(T),
    Other,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = Obj<T>;

            visit_any_scalars!(null => Obj::Other, other => Obj::Other);

            fn visit_str<E>(self, _: &str) -> Result<Obj<T>, E> {
                Ok(Obj::Other)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Obj<T>, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Obj::Other)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Obj::Map)
            }
        }

        deserializer.deserialize_any(ObjVisitor(PhantomData))
    }
}

/// A value read further only when it is a string, borrowed from the body when it has no
/// escapes.
#[derive(Default, PartialEq, Eq)]
#[cfg_attr(test, derive(Debug))]
enum Str<'a> {
    #[default]
    Absent,
    Text(Cow<'a, str>),
    Other,
}

impl Str<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Str::Text(text) => Some(text),
            Str::Absent | Str::Other => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;

        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;

            visit_any_scalars!(null => Str::Other, other => Str::Other);

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Str<'de>, E> {
                Ok(Str::Text(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Str<'de>, E> {
                Ok(Str::Text(Cow::Owned(text.to_owned())))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Str<'de>, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Str::Other)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Str<'de>, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Str::Other)
            }
        }

        deserializer.deserialize_any(StrVisitor)
    }
}

/// A tool parameter schema, walked the way [`super::schema`] walks it: `dirty` when a removed
/// keyword sits in schema position or `required` names a property that is not declared.
#[derive(Default)]
struct Schema {
    dirty: bool,
}

impl<'de> Deserialize<'de> for Schema {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SchemaVisitor { lists: false })
    }
}

/// A schema, or (where `items`, `allOf` and the like allow it) a list of schemas.
struct SchemaOrList(Schema);

impl<'de> Deserialize<'de> for SchemaOrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(SchemaVisitor { lists: true })
            .map(SchemaOrList)
    }
}

/// A map from names to schemas (`properties`, `$defs`, ...): the names, and whether any of the
/// schemas is dirty. Anything that is not an object holds no schema.
#[derive(Default)]
struct NamedSchemas<'a> {
    names: Option<Vec<Str<'a>>>,
    dirty: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for NamedSchemas<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedVisitor;

        impl<'de> Visitor<'de> for NamedVisitor {
            type Value = NamedSchemas<'de>;

            visit_any_scalars!(null => NamedSchemas::default(), other => NamedSchemas::default());

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut names = Vec::new();
                let mut dirty = false;
                while let Some(name) = map.next_key::<Str<'de>>()? {
                    // A name given twice: the `Value` keeps the last schema, so only the
                    // full path can tell.
                    dirty |= names.contains(&name);
                    dirty |= map.next_value::<Schema>()?.dirty;
                    names.push(name);
                }
                Ok(NamedSchemas {
                    names: Some(names),
                    dirty,
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| NamedSchemas::default())
            }

            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(NamedSchemas::default())
            }
        }

        deserializer.deserialize_any(NamedVisitor)
    }
}

struct SchemaVisitor {
    lists: bool,
}

impl<'de> Visitor<'de> for SchemaVisitor {
    type Value = Schema;

    visit_any_scalars!(null => Schema::default(), other => Schema::default());

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Schema, A::Error> {
        let mut dirty = false;
        let mut properties: Option<NamedSchemas<'de>> = None;
        let mut required: Option<Shape<Vec<Str<'de>>>> = None;
        let mut pattern_properties = false;
        while let Some(key) = map.next_key::<Str<'de>>()? {
            let Some(key) = key.as_str() else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            match key {
                key if REMOVED_KEYWORDS.contains(&key) => {
                    dirty = true;
                    map.next_value::<IgnoredAny>()?;
                }
                "properties" => {
                    let named = map.next_value::<NamedSchemas<'de>>()?;
                    dirty |= named.dirty || properties.is_some();
                    properties = Some(named);
                }
                "required" => {
                    dirty |= required.is_some();
                    required = Some(map.next_value()?);
                }
                "patternProperties" | "$defs" | "definitions" | "dependentSchemas"
                | "dependencies" => {
                    pattern_properties |= key == "patternProperties";
                    dirty |= map.next_value::<NamedSchemas<'de>>()?.dirty;
                }
                "items" | "prefixItems" | "allOf" | "anyOf" | "oneOf" => {
                    dirty |= map.next_value::<SchemaOrList>()?.0.dirty;
                }
                "additionalItems" | "contains" | "not" | "if" | "then" | "else"
                | "propertyNames" | "unevaluatedItems" => {
                    dirty |= map.next_value::<Schema>()?.dirty;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // `prune_required`: with `properties` an object, no `patternProperties`, and `required`
        // a list, every entry must name a declared property.
        if !pattern_properties
            && let Some(NamedSchemas {
                names: Some(names), ..
            }) = &properties
            && let Some(Shape::List(required)) = &required
        {
            dirty |= !required
                .iter()
                .all(|entry| entry.as_str().is_some() && names.contains(entry));
        }
        Ok(Schema { dirty })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Schema, A::Error> {
        let mut dirty = false;
        if self.lists {
            while let Some(schema) = seq.next_element::<Schema>()? {
                dirty |= schema.dirty;
            }
        } else {
            IgnoredAny.visit_seq(seq)?;
        }
        Ok(Schema { dirty })
    }

    fn visit_str<E>(self, _: &str) -> Result<Schema, E> {
        Ok(Schema::default())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::super::request::sanitize_request;
    use super::*;

    #[test]
    fn elements_are_cut_where_a_parser_cuts_them() {
        #[rustfmt::skip]
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("[]", Some(&[])),
            ("[ ]", Some(&[])),
            ("[1]", Some(&["1"])),
            ("[ 1 , -2.5e3 ,true,null ]", Some(&["1", "-2.5e3", "true", "null"])),
            (r#"["a\"],", "\\", "\\\"", "]}"]"#, Some(&[r#""a\"],""#, r#""\\""#, r#""\\\"""#, r#""]}""#])),
            (r#"[{"k": "]}", "l": [1, {"m": []}]}, [[], {}],"\u005d"]"#,
             Some(&[r#"{"k": "]}", "l": [1, {"m": []}]}"#, "[[], {}]", r#""\u005d""#])),
            ("[\n  {\"a\": 1}\n,\n\t\"b\"\r\n]", Some(&["{\"a\": 1}", "\"b\""])),
            ("{\"a\": [1]}", None),
            ("\"[1]\"", None),
        ];
        for (text, want) in cases {
            let raw: &RawValue = serde_json::from_str(text).unwrap();
            assert_eq!(elements(raw.get()).as_deref(), *want, "{text}");
        }
    }

    /// What the full path says: whether the request needs no change, and its tools.
    fn full_path(body: &str) -> Option<(bool, ToolContext)> {
        let mut value: Value = serde_json::from_str(body).ok()?;
        let tools = ToolContext::from_request(&value);
        Some((sanitize_request(&mut value).is_empty(), tools))
    }

    #[test]
    fn agrees_with_the_full_path() {
        // (body, whether the view must call it clean)
        #[rustfmt::skip]
        let cases: &[(&str, bool)] = &[
            (r#"{}"#, true),
            (r#"{"model": "m", "messages": [], "tools": []}"#, true),
            (r#"{"messages": [{"role": "user", "content": "hi"}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": "hi\n\u00e9"}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": " \n"}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": "\u0020\n"}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": ""}]}"#, false),
            (r#"{"messages": [{"role": "user"}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": []}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": {}}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": 3}]}"#, true),
            (r#"{"messages": ["raw", 1, null, [], {"role": "user", "content": "q"}]}"#, true),
            (r#"{"messages": {"role": "user", "content": ""}}"#, true),
            (r#"{"messages": [{"role": 5, "content": "q"}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": "q", "role": "user"}]}"#, false),
            // Text blocks.
            (r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "\t"}]}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": [{"type": "text"}, {"type": "text", "text": "x"}]}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": null}, {"type": "text", "text": "x"}]}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}"#, true),
            (r#"{"messages": [{"role": "user", "content": [{"type": "image"}, "raw"]}]}"#, true),
            (r#"{"system": [{"type": "text", "text": " "}], "messages": []}"#, false),
            (r#"{"system": [{"type": "text", "text": "be brief"}, 7], "messages": []}"#, true),
            (r#"{"system": " ", "messages": []}"#, true),
            // Tool calls and results, OpenAI.
            (r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1"}]}, {"role": "tool", "tool_call_id": "c1", "content": ""}]}"#, true),
            (r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1"}]}, {"role": "tool", "tool_call_id": "c2", "content": "x"}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "tool_calls": [{"id": "c1"}]}]}"#, true),
            (r#"{"messages": [{"role": "assistant", "tool_calls": []}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "function_call": {"name": "f"}}]}"#, true),
            (r#"{"messages": [{"role": "assistant", "function_call": "f"}]}"#, false),
            (r#"{"messages": [{"role": "tool", "tool_call_id": "c1", "content": "x"}]}"#, false),
            (r#"{"messages": [{"role": "tool", "content": "x"}]}"#, true),
            (r#"{"messages": [{"role": "function", "tool_call_id": null, "content": "x"}]}"#, true),
            (r#"{"messages": [{"role": "assistant", "content": "a", "tool_calls": [{"id": "c1"}]}, {"role": "assistant", "content": "b"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "content": "a", "tool_calls": [{"id": "c\u0031"}]}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]}"#, true),
            // Tool use and results, Anthropic.
            (r#"{"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1"}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "out"}]}]}]}"#, true),
            (r#"{"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1"}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": ""}]}]}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1"}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2"}]}]}"#, false),
            (r#"{"messages": [{"role": "assistant", "content": [{"type": "text", "id": "t1"}]}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}]}"#, false),
            (r#"{"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}"#, true),
            // stream_options is the model rules' business, not the general pass's.
            (r#"{"stream_options": {"include_usage": true}}"#, true),
            (r#"{"stream_options": null}"#, true),
            (r#"{"messages": [{"role": "user", "content": "q", "stream_options": 1}]}"#, true),
            // Schemas.
            (r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"$schema": {"type": "string", "pattern": "a"}, "additionalProperties": {}}, "required": ["$schema"]}}}]}"#, true),
            (r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$schema": "x"}}}]}"#, false),
            (r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"\u0024schema": "x"}}}]}"#, false),
            (r#"{"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"additionalProperties": false}}}}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"items": [{"$comment": "c"}]}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"anyOf": [{}, {"not": {"unevaluatedProperties": false}}]}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"$defs": {"x": {"$id": "y"}}}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"default": {"$schema": 1}, "enum": [{"$id": 2}], "const": {"additionalProperties": 3}}}]}"#, true),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "required": ["a", "b"]}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "required": ["a", 1]}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "required": ["\u0061"]}}]}"#, true),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "patternProperties": {}, "required": ["b"]}}]}"#, true),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "required": "b"}}]}"#, true),
            (r#"{"tools": [{"name": "f", "input_schema": {"properties": {"a": {}}, "properties": {"b": {}}, "required": ["a"]}}]}"#, false),
            (r#"{"tools": [{"name": "f", "input_schema": {"dependencies": {"a": ["b"]}, "items": true}}]}"#, true),
            (r#"{"tools": [{"type": "function", "name": "f", "parameters": {"$schema": "x"}}]}"#, false),
            // Names for the response fixer.
            (r#"{"tools": [{"type": "function", "function": {"name": "g"}, "name": "h"}, {"name": "a"}, {"function": null, "name": "b"}, {"function": {"name": 1}, "name": "c"}, {"function": {}, "name": "d"}, "raw"]}"#, true),
            // Whatever cannot be read goes down the full path.
            (r#"[{"messages": []}]"#, false),
            (r#"{"messages": [}"#, false),
        ];
        for (body, want_clean) in cases {
            let view = clean_request(body.as_bytes());
            assert_eq!(view.is_some(), *want_clean, "{body}");
            if let Some(tools) = view {
                let (clean, full_tools) = full_path(body).expect("a clean body parses");
                assert!(clean, "the view called a dirty request clean: {body}");
                assert_eq!(tools, full_tools, "{body}");
            }
        }
    }

    #[test]
    fn tool_names_follow_the_full_path() {
        let body = r#"{"tools": [{"type": "function", "function": {"name": "g"}, "name": "h"}, {"name": "a"}, {"function": null, "name": "b"}, {"function": {"name": 1}, "name": "c"}, {"function": {}, "name": "d"}, "raw"]}"#;
        let tools = clean_request(body.as_bytes()).unwrap();
        assert_eq!(tools.declared().collect::<Vec<_>>(), ["g", "a", "b", "d"]);
    }
}
