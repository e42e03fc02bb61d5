//! How a partition resumes when it is assigned, decided once from its newest checkpoint for
//! every partitioned service: the services differ only in what their state is.

use std::collections::BTreeMap;

use crate::checkpoint::{Envelope, OperatorDecision};

/// Where a partition's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume<'a> {
    /// The checkpointed state. `recorded_config` is the configuration text (meters, catalog)
    /// it was written under when that differs from the current one: the service re-derives
    /// what it already output with the recorded one, then switches (docs/operations.md,
    /// "Changing configuration").
    Checkpoint { state: &'a [u8], recorded_config: Option<&'a str> },
    /// Fresh state from these offsets per input topic (a topic not named: 0), by an
    /// operator's decision (`meterflow-admin checkpoint replay|reset`).
    Operator { offsets: &'a BTreeMap<String, i64>, decision: &'a OperatorDecision },
    /// No checkpoint: fresh state from the beginning.
    Fresh,
}

impl<'a> Resume<'a> {
    pub fn of(from: Option<&'a Envelope>, current_config: &str) -> Self {
        let Some(env) = from else { return Resume::Fresh };
        if let Some(decision) = &env.meta.operator {
            return Resume::Operator { offsets: &env.meta.offsets, decision };
        }
        // Checkpoints from before the text was recorded carry none: nothing to compare with.
        let recorded = env.meta.config_text.as_str();
        let recorded_config = (!recorded.is_empty() && recorded != current_config).then_some(recorded);
        Resume::Checkpoint { state: &env.state, recorded_config }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Meta;

    fn env(config_text: &str, operator: Option<OperatorDecision>) -> Envelope {
        let meta = Meta { config_text: config_text.into(), operator, offsets: [("t".to_owned(), 7)].into(), ..Meta::default() };
        Envelope { meta, state: vec![1, 2, 3] }
    }

    #[test]
    fn each_way_of_resuming() {
        assert_eq!(Resume::of(None, "x"), Resume::Fresh);
        let same = env("x", None);
        assert_eq!(Resume::of(Some(&same), "x"), Resume::Checkpoint { state: &[1, 2, 3], recorded_config: None });
        let before_texts = env("", None);
        assert_eq!(Resume::of(Some(&before_texts), "x"), Resume::Checkpoint { state: &[1, 2, 3], recorded_config: None });
        let changed = env("old", None);
        assert_eq!(Resume::of(Some(&changed), "x"), Resume::Checkpoint { state: &[1, 2, 3], recorded_config: Some("old") });
        let decision = OperatorDecision { action: "replay".into(), next_seq: Some(3), note: String::new() };
        let decided = env("old", Some(decision.clone()));
        match Resume::of(Some(&decided), "x") {
            Resume::Operator { offsets, decision: d } => {
                assert_eq!(offsets.get("t"), Some(&7));
                assert_eq!(d, &decision);
            }
            other => panic!("an operator decision wins over the state: {other:?}"),
        }
    }
}
