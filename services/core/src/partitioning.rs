//! The partitioning contract: **the message key of a usage event (and of a wallet
//! adjustment) is its tenant, and its partition is `crc32(tenant) % partitions`** — librdkafka's
//! default `consistent_random` partitioner for keyed messages, which every librdkafka-based
//! client (Rust rdkafka, Python confluent-kafka, Go confluent-kafka-go, node-rdkafka) uses
//! unless told otherwise. Java clients hash with murmur2 by default and must be given a
//! partitioner that implements this function (docs/operations.md).
//!
//! Why it matters: a tenant's duplicates, windows and wallet live in the state of one
//! partition. A record of tenant T on another partition would be deduplicated against the
//! wrong state (a retry counted twice) and split T's windows, so the aggregator dead-letters
//! it as `wrong_partition` instead of counting it (`meterflow-admin redrive` re-publishes it
//! with the right key), and a changed partition count stops the services until an operator
//! decides.

/// The partition of `key` among `partitions` (librdkafka `consistent_random` for a non-empty key).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (crc32fast::hash(key) % partitions as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_zlib_one() {
        // The check value of CRC-32/ISO-HDLC (zlib, librdkafka's rd_crc32).
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition_for(b"123456789", 7), (0xCBF4_3926u32 % 7) as i32);
        assert_eq!(partition_for(b"x", 1), 0);
    }
}
