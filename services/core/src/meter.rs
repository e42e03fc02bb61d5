//! Meter definitions: what to aggregate, grouped by which dimensions, in which windows.
//!
//! Loaded from TOML (`[[meter]]` tables). Every error names the meter and the field, because
//! the person reading it is editing that file.

use std::collections::HashMap;

use serde::Deserialize;

use crate::Error;

/// How the events of one window combine into its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Aggregation {
    Sum,
    Count,
    Min,
    Max,
    /// Sum / count, rounded half-to-even to 9 fractional digits.
    Avg,
    /// Exact number of distinct values of `unique_dimension`.
    UniqueCount,
    /// The quantity of the event with the greatest event time; ties go to the greatest event id.
    Latest,
}

impl Aggregation {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

/// One validated meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterDef {
    pub name: String,
    pub aggregation: Aggregation,
    /// Dimensions that split the totals, sorted; other dimensions are ignored.
    pub group_by: Vec<String>,
    /// For `unique_count`: the dimension whose distinct values are counted.
    pub unique_dimension: Option<String>,
    /// Tumbling window size in milliseconds (a whole number of seconds).
    pub window_ms: i64,
    /// How far behind the highest event time seen a window stays open.
    pub allowed_lateness_ms: i64,
    /// How far ahead of the watermark an event time may be before it is rejected.
    pub max_future_ms: i64,
    /// Whether negative quantities (credits, corrections) are allowed.
    pub allow_negative: bool,
    /// Largest accepted |quantity| of one event; above it the event is dead-lettered as
    /// `quantity_out_of_range`. None: no per-event bound beyond the numeric range of the
    /// pipeline (see docs/numbers.md).
    pub max_quantity: Option<rust_decimal::Decimal>,
}

impl MeterDef {
    /// Start of the window holding `event_time_ms` (floor, also for times before 1970).
    pub fn window_start(&self, event_time_ms: i64) -> i64 {
        event_time_ms.div_euclid(self.window_ms) * self.window_ms
    }
}

/// All meters, looked up by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterCatalog {
    meters: Vec<MeterDef>,
    by_name: HashMap<String, usize>,
    /// How CloudEvents feed the meters (HTTP ingest); kept beside the definitions rather
    /// than in [`MeterDef`] because only the API reads it.
    ingest: crate::ingest::IngestMap,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    meter: Vec<RawMeter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    name: String,
    aggregation: String,
    #[serde(default)]
    group_by: Vec<String>,
    unique_dimension: Option<String>,
    window: toml::Value,
    #[serde(default)]
    allowed_lateness: Option<toml::Value>,
    #[serde(default)]
    max_future: Option<toml::Value>,
    #[serde(default)]
    allow_negative: bool,
    #[serde(default)]
    max_quantity: Option<toml::Value>,
    /// CloudEvents `type` this meter reads (HTTP ingest; default: the meter's name).
    #[serde(default)]
    event_type: Option<String>,
    /// Path of the quantity in a CloudEvent's `data` (default `$.value`; none for `count`).
    #[serde(default)]
    value_property: Option<String>,
    #[serde(default)]
    provider_cost_property: Option<String>,
    /// Dimension name -> path in `data` (default: each dimension the meter uses at `$.<name>`).
    #[serde(default)]
    dimension_properties: std::collections::BTreeMap<String, String>,
}

impl MeterCatalog {
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        let raw: RawFile = toml::from_str(text).map_err(|e| Error::Config(format!("meters file: {e}")))?;
        let mut meters = Vec::with_capacity(raw.meter.len());
        let mut ingest = Vec::with_capacity(raw.meter.len());
        for mut m in raw.meter {
            let raw_ingest = crate::ingest::RawIngest {
                event_type: m.event_type.take(),
                value_property: m.value_property.take(),
                provider_cost_property: m.provider_cost_property.take(),
                dimension_properties: std::mem::take(&mut m.dimension_properties),
            };
            let def = validate(m)?;
            ingest.push(crate::ingest::meter_ingest(&def, &raw_ingest).map_err(|(f, r)| invalid(&def.name, &f, r))?);
            meters.push(def);
        }
        let mut catalog = Self::new(meters)?;
        catalog.ingest = crate::ingest::IngestMap::new(ingest);
        Ok(catalog)
    }

    /// A catalog of `meters`; CloudEvents read them with the default mapping.
    pub fn new(meters: Vec<MeterDef>) -> Result<Self, Error> {
        let mut by_name = HashMap::new();
        for (i, m) in meters.iter().enumerate() {
            if by_name.insert(m.name.clone(), i).is_some() {
                return Err(invalid(&m.name, "name", "defined twice"));
            }
        }
        let mut ingest = Vec::with_capacity(meters.len());
        for m in &meters {
            ingest.push(
                crate::ingest::meter_ingest(m, &crate::ingest::RawIngest::default()).map_err(|(f, r)| invalid(&m.name, &f, r))?,
            );
        }
        Ok(Self { meters, by_name, ingest: crate::ingest::IngestMap::new(ingest) })
    }

    /// How CloudEvents feed these meters.
    pub fn ingest(&self) -> &crate::ingest::IngestMap {
        &self.ingest
    }

    pub fn get(&self, name: &str) -> Option<&MeterDef> {
        self.by_name.get(name).map(|&i| &self.meters[i])
    }

    pub fn meters(&self) -> &[MeterDef] {
        &self.meters
    }
}

fn invalid(meter: &str, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidMeter {
        meter: meter.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn validate(m: RawMeter) -> Result<MeterDef, Error> {
    let name = m.name.clone();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
        return Err(invalid(&name, "name", "must be non-empty [A-Za-z0-9_.-]"));
    }
    let aggregation = Aggregation::parse(&m.aggregation).ok_or_else(|| {
        invalid(&name, "aggregation", format!("{:?} is not one of sum, count, min, max, avg, unique_count, latest", m.aggregation))
    })?;
    let window_ms = parse_window(&m.window).map_err(|r| invalid(&name, "window", r))?;
    let allowed_lateness_ms = match &m.allowed_lateness {
        None => 0,
        Some(v) => parse_duration_value(v).map_err(|r| invalid(&name, "allowed_lateness", r))?,
    };
    let max_future_ms = match &m.max_future {
        None => 5 * 60 * 1000,
        Some(v) => parse_duration_value(v).map_err(|r| invalid(&name, "max_future", r))?,
    };
    let mut group_by = m.group_by;
    group_by.sort();
    if group_by.windows(2).any(|w| w[0] == w[1]) {
        return Err(invalid(&name, "group_by", "lists a dimension twice"));
    }
    if group_by.iter().any(String::is_empty) {
        return Err(invalid(&name, "group_by", "empty dimension name"));
    }
    match (aggregation, &m.unique_dimension) {
        (Aggregation::UniqueCount, None) => {
            return Err(invalid(&name, "unique_dimension", "required for unique_count"))
        }
        (Aggregation::UniqueCount, Some(d)) if d.is_empty() => {
            return Err(invalid(&name, "unique_dimension", "empty dimension name"))
        }
        (a, Some(_)) if a != Aggregation::UniqueCount => {
            return Err(invalid(&name, "unique_dimension", "only valid with aggregation = \"unique_count\""))
        }
        _ => {}
    }
    let max_quantity = match &m.max_quantity {
        None => None,
        Some(v) => Some(parse_max_quantity(v).map_err(|r| invalid(&name, "max_quantity", r))?),
    };
    Ok(MeterDef {
        name,
        aggregation,
        group_by,
        unique_dimension: m.unique_dimension,
        window_ms,
        allowed_lateness_ms,
        max_future_ms,
        allow_negative: m.allow_negative,
        max_quantity,
    })
}

/// A positive decimal, written as an integer (`1000000000`) or a canonical decimal string
/// (`"1e9"` is not one: exponents are refused as on the wire).
fn parse_max_quantity(v: &toml::Value) -> Result<rust_decimal::Decimal, String> {
    let d = match v {
        toml::Value::Integer(i) => rust_decimal::Decimal::from(*i),
        toml::Value::String(s) => crate::decimal::parse("max_quantity", s).map_err(|e| e.to_string())?,
        other => return Err(format!("expected an integer or a decimal string like \"1000000000\", got {other}")),
    };
    if d <= rust_decimal::Decimal::ZERO {
        return Err(format!("must be positive, got {d}"));
    }
    Ok(d)
}

fn parse_window(v: &toml::Value) -> Result<i64, String> {
    let ms = match v {
        toml::Value::String(s) => match s.as_str() {
            "minute" => 60_000,
            "hour" => 3_600_000,
            "day" => 86_400_000,
            other => parse_duration(other)?,
        },
        other => parse_duration_value(other)?,
    };
    if ms <= 0 || ms % 1000 != 0 {
        return Err(format!("must be a positive whole number of seconds, got {ms} ms"));
    }
    Ok(ms)
}

fn parse_duration_value(v: &toml::Value) -> Result<i64, String> {
    match v {
        toml::Value::Integer(secs) if *secs >= 0 => secs
            .checked_mul(1000)
            .ok_or_else(|| "too large".to_string()),
        toml::Value::Integer(_) => Err("must not be negative".into()),
        toml::Value::String(s) => parse_duration(s),
        other => Err(format!("expected seconds or a duration like \"90s\", \"5m\", \"2h\", \"35d\", got {other}")),
    }
}

/// Parses a duration into milliseconds: humantime's forms (`"500ms"`, `"90s"`, `"5m"`,
/// `"2h"`, `"35d"`, `"1h 30m"`, `"2days"`) or a bare number of seconds, the form the meters
/// file and the flags took before humantime. Whole milliseconds only: every consumer does
/// event-time arithmetic in ms, and silently dropping a `"1500us"` remainder would surprise.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let ms = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| format!("{s:?} is too large"))?;
        u128::from(secs) * 1000
    } else {
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration like \"90s\", \"5m\", \"2h\", \"35d\", \"1h 30m\" ({e})"))?;
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(format!("{s:?} is not a whole number of milliseconds"));
        }
        d.as_millis()
    };
    i64::try_from(ms).map_err(|_| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[meter]]
        name = "input_tokens"
        aggregation = "sum"
        group_by = ["region", "model"]
        window = "minute"
        allowed_lateness = "30s"

        [[meter]]
        name = "active_users"
        aggregation = "unique_count"
        unique_dimension = "user"
        window = 3600
    "#;

    #[test]
    fn parses_and_sorts_group_by() {
        let c = MeterCatalog::from_toml_str(GOOD).unwrap();
        let m = c.get("input_tokens").unwrap();
        assert_eq!(m.group_by, vec!["model", "region"]);
        assert_eq!(m.window_ms, 60_000);
        assert_eq!(m.allowed_lateness_ms, 30_000);
        assert_eq!(c.get("active_users").unwrap().window_ms, 3_600_000);
        assert_eq!(m.window_start(-1), -60_000);
        assert_eq!(m.max_quantity, None);
    }

    #[test]
    fn durations_take_humantime_forms_and_bare_seconds() {
        let cases = [("500ms", 500), ("90s", 90_000), ("5m", 300_000), ("2h", 7_200_000), ("35d", 3_024_000_000)];
        for (text, ms) in cases {
            assert_eq!(parse_duration(text), Ok(ms), "{text}");
        }
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration("2days"), Ok(172_800_000));
        assert_eq!(parse_duration(" 45 "), Ok(45_000), "a bare number is seconds, as before humantime");
        for bad in ["", "ten", "5 parsecs", "1500us", "-5s", "99999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn max_quantity_as_integer_or_decimal_string() {
        let text = "[[meter]]\nname = \"a\"\naggregation = \"sum\"\nwindow = 60\nmax_quantity = 1000000000\n\
                    [[meter]]\nname = \"b\"\naggregation = \"sum\"\nwindow = 60\nmax_quantity = \"0.5\"\n";
        let c = MeterCatalog::from_toml_str(text).unwrap();
        assert_eq!(c.get("a").unwrap().max_quantity, Some(rust_decimal::Decimal::from(1_000_000_000)));
        assert_eq!(c.get("b").unwrap().max_quantity, Some(rust_decimal::Decimal::new(5, 1)));
    }

    #[test]
    fn errors_name_meter_and_field() {
        // (aggregation, window, an extra line) of meter "x", and the field the error names.
        let cases = [
            ("median", "minute", "", "aggregation"),
            ("sum", "1500ms", "", "window"),
            ("unique_count", "minute", "", "unique_dimension"),
            ("sum", "minute", "allowed_lateness = \"5 parsecs\"", "allowed_lateness"),
            ("sum", "minute", "max_quantity = \"1e9\"", "max_quantity"),
            ("sum", "minute", "max_quantity = 0", "max_quantity"),
        ];
        for (aggregation, window, extra, field) in cases {
            let text = format!("[[meter]]\nname = \"x\"\naggregation = \"{aggregation}\"\nwindow = \"{window}\"\n{extra}");
            match MeterCatalog::from_toml_str(&text) {
                Err(Error::InvalidMeter { meter, field: f, .. }) => {
                    assert_eq!(meter, "x");
                    assert_eq!(f, field);
                }
                other => panic!("expected InvalidMeter on {field}, got {other:?}"),
            }
        }
        let unknown = "[[meter]]\nname = \"x\"\naggregation = \"sum\"\nwindow = 60\ncolour = \"red\"";
        assert!(matches!(MeterCatalog::from_toml_str(unknown), Err(Error::Config(_))));
    }
}
