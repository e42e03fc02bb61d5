//! The Avro schemas of `schemas/avro/`, embedded at build time so the binary and the files
//! can never disagree.

use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;

pub const USAGE_EVENT_V1: &str = include_str!("../../../schemas/avro/usage_event.v1.avsc");
pub const USAGE_EVENT_V2: &str = include_str!("../../../schemas/avro/usage_event.v2.avsc");
pub const METER_AGGREGATE_V1: &str = include_str!("../../../schemas/avro/meter_aggregate.v1.avsc");
pub const METER_AGGREGATE_V2: &str = include_str!("../../../schemas/avro/meter_aggregate.v2.avsc");
pub const CHARGE_V1: &str = include_str!("../../../schemas/avro/charge.v1.avsc");
pub const DEAD_LETTER_V1: &str = include_str!("../../../schemas/avro/dead_letter.v1.avsc");
pub const WALLET_ADJUSTMENT_V1: &str =
    include_str!("../../../schemas/avro/wallet_adjustment.v1.avsc");

/// A parsed schema with its CRC-64-AVRO (Rabin) fingerprint, as used by single-object encoding.
#[derive(Debug)]
pub struct Known {
    pub schema: Schema,
    pub fingerprint: u64,
}

fn load(text: &str) -> Known {
    // The texts are compiled in and covered by tests: failing here is a build defect.
    let schema = Schema::parse_str(text).expect("embedded Avro schema parses");
    let fp = schema.fingerprint::<Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&fp.bytes[..8]);
    Known {
        schema,
        fingerprint: u64::from_le_bytes(bytes),
    }
}

macro_rules! known {
    ($fn_name:ident, $text:expr) => {
        pub fn $fn_name() -> &'static Known {
            static CELL: OnceLock<Known> = OnceLock::new();
            CELL.get_or_init(|| load($text))
        }
    };
}

known!(usage_event_v1, USAGE_EVENT_V1);
known!(usage_event_v2, USAGE_EVENT_V2);
known!(meter_aggregate_v1, METER_AGGREGATE_V1);
known!(meter_aggregate_v2, METER_AGGREGATE_V2);
known!(charge_v1, CHARGE_V1);
known!(dead_letter_v1, DEAD_LETTER_V1);
known!(wallet_adjustment_v1, WALLET_ADJUSTMENT_V1);
