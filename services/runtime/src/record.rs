//! The record a partitioned service handles, independent of where it was consumed from.
//!
//! [`Record`] borrows everything from the consumer's buffer: on the hot path (~100k records a
//! second per aggregator) building one is a handful of pointer reads, no allocation. rdkafka's
//! `BorrowedMessage` converts to it ([`crate::source::KafkaSource`]); the in-memory driver
//! (`memory`, the `memory` feature) builds it from its own records, so the loop and the
//! services can be tested without a broker.

use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Headers as _};
use rdkafka::Message as _;

/// When a record was produced or appended, as the broker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamp {
    NotAvailable,
    /// The producer's clock (trustworthy only if every producer is).
    CreateTime(i64),
    /// The broker's clock at append (what meterflow-admin configures on its topics).
    LogAppendTime(i64),
}

impl Timestamp {
    /// Milliseconds since the epoch, whichever clock set them.
    pub fn to_millis(self) -> Option<i64> {
        match self {
            Timestamp::NotAvailable => None,
            Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
        }
    }
}

impl From<rdkafka::Timestamp> for Timestamp {
    fn from(t: rdkafka::Timestamp) -> Self {
        match t {
            rdkafka::Timestamp::NotAvailable => Timestamp::NotAvailable,
            rdkafka::Timestamp::CreateTime(t) => Timestamp::CreateTime(t),
            rdkafka::Timestamp::LogAppendTime(t) => Timestamp::LogAppendTime(t),
        }
    }
}

/// A record's headers, read where they are (librdkafka's buffer or an in-memory list).
#[derive(Clone, Copy)]
pub enum Headers<'a> {
    None,
    Kafka(&'a BorrowedHeaders),
    List(&'a [(String, Vec<u8>)]),
}

impl<'a> Headers<'a> {
    /// The value of the first header named `name` (`None` if absent or null).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        match *self {
            Headers::None => None,
            Headers::Kafka(h) => h.iter().find(|h| h.key == name)?.value,
            Headers::List(l) => l.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice()),
        }
    }
}

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        match *self {
            Headers::None => {}
            Headers::Kafka(h) => {
                list.entries(h.iter().map(|h| h.key));
            }
            Headers::List(l) => {
                list.entries(l.iter().map(|(k, _)| k));
            }
        }
        list.finish()
    }
}

/// One consumed record. A null payload reads as empty (no service tells them apart).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Headers<'a>,
    pub timestamp: Timestamp,
}

impl<'a> Record<'a> {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.get(name)
    }
}

/// Something the loop received that reads as a [`Record`].
pub trait AsRecord {
    fn record(&self) -> Record<'_>;
}

impl AsRecord for BorrowedMessage<'_> {
    fn record(&self) -> Record<'_> {
        Record {
            topic: self.topic(),
            partition: self.partition(),
            offset: self.offset(),
            key: self.key(),
            payload: self.payload().unwrap_or_default(),
            headers: self.headers().map_or(Headers::None, Headers::Kafka),
            timestamp: self.timestamp().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_header_of_a_name_wins() {
        let list = vec![
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
            ("a".to_owned(), b"3".to_vec()),
        ];
        let h = Headers::List(&list);
        assert_eq!(h.get("a"), Some(&b"1"[..]));
        assert_eq!(h.get("b"), Some(&b"2"[..]));
        assert_eq!(h.get("c"), None);
        assert_eq!(Headers::None.get("a"), None);
    }

    #[test]
    fn timestamps_keep_their_clock() {
        assert_eq!(Timestamp::from(rdkafka::Timestamp::LogAppendTime(5)), Timestamp::LogAppendTime(5));
        assert_eq!(Timestamp::from(rdkafka::Timestamp::CreateTime(7)).to_millis(), Some(7));
        assert_eq!(Timestamp::from(rdkafka::Timestamp::NotAvailable).to_millis(), None);
    }
}
