//! The provisional total of an open window (schemas/avro/provisional_total.v1.avsc).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::AvroRecord;
use crate::decimal::check_storable;
use crate::schema::{self, Known};
use crate::Error;

/// The running total of a window that has not closed yet. Published by the aggregator on each
/// flush for the open windows that changed since the previous flush; priced by the rater as
/// *pending* spend until the window's final aggregate is rated. See `rating::pending`.
/// `Default` as for [`MeterAggregate`](crate::records::MeterAggregate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionalTotal {
    pub tenant: String,
    pub meter: String,
    pub aggregation: String,
    pub dimensions: BTreeMap<String, String>,
    pub window_start: i64,
    pub window_end: i64,
    /// Partition time at which the window closes (end plus the meter's allowed lateness).
    pub closes_at: i64,
    /// The value the final aggregate would carry if the window closed now.
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    pub event_count: i64,
    pub source_partition: i32,
    /// First source offset not covered: a newer total of the same window has a higher one.
    pub as_of_offset: i64,
    /// Aggregator wall clock at publication (lag metrics only; decides nothing).
    pub published_at: i64,
}

impl AvroRecord for ProvisionalTotal {
    fn known() -> &'static Known {
        schema::provisional_total_v1()
    }
    fn check_decimals(&self) -> Result<(), Error> {
        check_storable("value", &self.value)
    }
    fn check_names(&self) -> Result<(), Error> {
        super::check_aggregation(&self.aggregation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = ProvisionalTotal {
            tenant: "t".into(),
            meter: "input_tokens".into(),
            aggregation: "sum".into(),
            dimensions: [("model".to_owned(), "gpt-4o".to_owned())].into(),
            window_start: 60_000,
            window_end: 120_000,
            closes_at: 130_000,
            value: Decimal::new(12_345, 3),
            event_count: 3,
            source_partition: 2,
            as_of_offset: 17,
            published_at: 1_700_000_000_000,
        };
        let bytes = p.to_avro().unwrap();
        assert_eq!(ProvisionalTotal::from_avro(&bytes).unwrap(), p);
        let mut finer = p.clone();
        finer.value = Decimal::new(1, 10);
        let bytes = finer.to_avro().unwrap();
        assert!(ProvisionalTotal::from_avro(&bytes).is_err(), "more than 9 fractional digits is refused on read");
        let mut unknown = p;
        unknown.aggregation = "median".into();
        let refused = Error::UnknownName { field: "aggregation", value: "median".into() };
        assert_eq!(unknown.to_avro(), Err(refused));
    }
}
