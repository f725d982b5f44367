//! The code blocks of `docs/upstream.md`, read from the file so that the tests check what
//! the document says, not a copy of it: a block's info string (after the opening fence)
//! names what it is, e.g. `json v3.tenant1.app1.devices.dev1.up` for the example of an
//! event published on that subject, `json queue-item`, or `sh redis` for Redis commands.

use std::path::Path;

use serde_json::Value;

/// The document every block comes from.
pub const UPSTREAM_DOC: &str = "docs/upstream.md";

/// One fenced code block.
#[derive(Clone, Debug)]
pub struct Block {
    /// The info string after the opening fence (`json v3.tenant1…`), trimmed.
    pub info: String,
    /// The lines between the fences.
    pub text: String,
    /// The line of the opening fence (1-based), for failure messages.
    pub line: usize,
}

impl Block {
    /// The block as JSON; panics, naming the line, if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "{UPSTREAM_DOC}:{}: block `{}` is not JSON: {e}",
                self.line, self.info
            )
        })
    }
}

/// Every fenced code block of `docs/upstream.md`, in order.
pub fn upstream_doc_blocks() -> Vec<Block> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(UPSTREAM_DOC);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_owned(),
                    text: String::new(),
                    line: i + 1,
                })
            }
            (Some(_), Some(rest)) if rest.trim().is_empty() => {
                blocks.extend(open.take());
            }
            (Some(block), _) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "{UPSTREAM_DOC}: a code block is not closed");
    blocks
}

/// The blocks whose info string is exactly `info`.
pub fn blocks_tagged(info: &str) -> Vec<Block> {
    upstream_doc_blocks()
        .into_iter()
        .filter(|b| b.info == info)
        .collect()
}

/// The JSON example of the event published on `subject` (`v3.tenant1.app1.devices.dev1.up`).
pub fn event_example(subject: &str) -> Value {
    let blocks = blocks_tagged(&format!("json {subject}"));
    assert_eq!(
        blocks.len(),
        1,
        "{UPSTREAM_DOC} has {} examples for {subject}, expected one",
        blocks.len()
    );
    blocks[0].json()
}

/// Panics unless `got` has the shape of `example`: every member of every object of the
/// example is in `got` with a value of the same JSON type (recursively; arrays compare their
/// first elements). `got` may have more members. `at` names the place in failure messages.
pub fn assert_same_shape(example: &Value, got: &Value, at: &str) {
    match (example, got) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let member = have
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}.{key} is missing in {got}"));
                assert_same_shape(value, member, &format!("{at}.{key}"));
            }
        }
        (Value::Array(want), Value::Array(have)) => {
            if let Some(first) = want.first() {
                let member = have
                    .first()
                    .unwrap_or_else(|| panic!("{at} is empty, expected items like {first}"));
                assert_same_shape(first, member, &format!("{at}[0]"));
            }
        }
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Null, Value::Null) => {}
        _ => panic!("{at}: expected a value like {example}, got {got}"),
    }
}
