//! How each meter reads CloudEvents: the `type` that feeds it and the paths of its value and
//! dimensions in `data`, from the meters file.
//!
//! **Paths** (`value_property`, `dimension_properties`) select a value inside a CloudEvent's
//! `data`: `$` is `data` itself, `.name` an object member (`[A-Za-z0-9_-]+`), `['any name']`
//! a member whose name needs quoting (`\'` and `\\` escape), `[3]` an array element. Example:
//! `$.usage.input_tokens`, `$['model.name']`, `$.choices[0].tokens`.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::meter::{Aggregation, MeterDef};

/// How each meter reads CloudEvents: which `type` feeds it and where its value and
/// dimensions are in `data`. Built from the meters file (see [`crate::meter::MeterCatalog::ingest`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestMap {
    by_type: HashMap<String, Vec<MeterIngest>>,
}

/// One meter's CloudEvents mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterIngest {
    pub meter: String,
    /// The CloudEvents `type` that feeds the meter (default: the meter's name).
    pub event_type: String,
    /// Where the quantity is; `None` for `count` meters without one (each event counts 1).
    pub value: Option<JsonPath>,
    pub provider_cost: Option<JsonPath>,
    /// Dimension name -> where its value is (default: every `group_by` and the unique
    /// dimension from `$.<name>`).
    pub dimensions: Vec<(String, JsonPath)>,
}

impl IngestMap {
    pub fn new(meters: Vec<MeterIngest>) -> Self {
        let mut by_type: HashMap<String, Vec<MeterIngest>> = HashMap::new();
        for m in meters {
            by_type.entry(m.event_type.clone()).or_default().push(m);
        }
        Self { by_type }
    }

    /// The meters a CloudEvents `type` feeds (several meters may read one event, e.g.
    /// input and output tokens of one completion).
    pub fn meters_for(&self, event_type: &str) -> &[MeterIngest] {
        self.by_type.get(event_type).map_or(&[], Vec::as_slice)
    }
}

/// A parsed path (see the module docs for the syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("path {text:?}: {why} (syntax: $.name, $['any name'], $.list[0])");
        let mut rest = text.strip_prefix('$').ok_or_else(|| bad("must start with $"))?;
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).unwrap_or(r.len());
                if end == 0 {
                    return Err(bad("empty name after ."));
                }
                steps.push(Step::Key(r[..end].to_owned()));
                rest = &r[end..];
            } else if let Some(r) = rest.strip_prefix("['") {
                let mut name = String::new();
                let mut chars = r.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, e @ ('\'' | '\\'))) => name.push(e),
                            _ => return Err(bad("only \\' and \\\\ are escapes")),
                        },
                        '\'' => {
                            end = Some(i);
                            break;
                        }
                        c => name.push(c),
                    }
                }
                let end = end.ok_or_else(|| bad("unterminated ['"))?;
                rest = r[end + 1..].strip_prefix(']').ok_or_else(|| bad("expected ] after '"))?;
                steps.push(Step::Key(name));
            } else if let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']').ok_or_else(|| bad("unterminated ["))?;
                let idx: usize = r[..end].parse().map_err(|_| bad("an index is a non-negative integer"))?;
                steps.push(Step::Index(idx));
                rest = &r[end + 1..];
            } else {
                return Err(bad("expected . or ["));
            }
        }
        Ok(Self { text: text.to_owned(), steps })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value at this path in the JSON text `data` (`None` when a member or element is
    /// missing or `data` has another shape there); `Err` when `data` is not valid JSON.
    pub fn select<'a>(&self, data: &'a str) -> Result<Option<&'a RawValue>, String> {
        let mut cur: &'a RawValue = serde_json::from_str(data).map_err(|e| e.to_string())?;
        for step in &self.steps {
            let text = cur.get().trim_start();
            let next = match step {
                Step::Key(k) if text.starts_with('{') => {
                    let obj: HashMap<String, &'a RawValue> = serde_json::from_str(cur.get()).map_err(|e| e.to_string())?;
                    obj.get(k).copied()
                }
                Step::Index(i) if text.starts_with('[') => {
                    let arr: Vec<&'a RawValue> = serde_json::from_str(cur.get()).map_err(|e| e.to_string())?;
                    arr.get(*i).copied()
                }
                _ => None,
            };
            match next {
                Some(n) => cur = n,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }
}

/// A meter's optional CloudEvents settings in the meters file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    pub event_type: Option<String>,
    pub value_property: Option<String>,
    pub provider_cost_property: Option<String>,
    #[serde(default)]
    pub dimension_properties: BTreeMap<String, String>,
}

/// Builds a meter's mapping, applying the defaults: `type` = the meter's name, value at
/// `$.value` (none for `count`), each `group_by` / unique dimension at `$.<name>`.
pub fn meter_ingest(def: &MeterDef, raw: &RawIngest) -> Result<MeterIngest, (String, String)> {
    let path = |field: &str, p: &str| JsonPath::parse(p).map_err(|e| (field.to_owned(), e));
    let value = match (&raw.value_property, def.aggregation) {
        (Some(p), _) => Some(path("value_property", p)?),
        (None, Aggregation::Count) => None,
        (None, _) => Some(path("value_property", "$.value")?),
    };
    let provider_cost = raw.provider_cost_property.as_deref().map(|p| path("provider_cost_property", p)).transpose()?;
    let mut dims: BTreeMap<String, JsonPath> = BTreeMap::new();
    for d in def.group_by.iter().chain(def.unique_dimension.iter()) {
        if d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            dims.insert(d.clone(), path("dimension_properties", &format!("$.{d}"))?);
        } else {
            let escaped = d.replace('\\', "\\\\").replace('\'', "\\'");
            dims.insert(d.clone(), path("dimension_properties", &format!("$['{escaped}']"))?);
        }
    }
    for (d, p) in &raw.dimension_properties {
        dims.insert(d.clone(), path("dimension_properties", p)?);
    }
    let event_type = raw.event_type.clone().unwrap_or_else(|| def.name.clone());
    if event_type.is_empty() {
        return Err(("event_type".into(), "must not be empty".into()));
    }
    Ok(MeterIngest {
        meter: def.name.clone(),
        event_type,
        value,
        provider_cost,
        dimensions: dims.into_iter().collect(),
    })
}
