//! How a partition resumes when it is assigned, decided once from its newest checkpoint for
//! every partitioned service: the services differ only in what their state is.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;

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

/// The configuration (meters, catalog) one partition runs with. A partition restored from a
/// checkpoint written under another configuration keeps that one until it has re-derived
/// everything it already output, so that no output id is ever emitted with other content;
/// then it switches to the current one (docs/operations.md, "Changing configuration").
#[derive(Debug)]
pub struct Configured<C, M> {
    pub config: Arc<C>,
    /// The text of `config`, recorded in the partition's checkpoints.
    pub text: String,
    pub switch: Option<Switch<C, M>>,
}

/// The current configuration, waiting for the partition to pass what it already output.
#[derive(Debug)]
pub struct Switch<C, M> {
    config: Arc<C>,
    text: String,
    /// The service's mark of the outputs already written under the recorded configuration,
    /// found by its `verify`; until then one that nothing passes.
    pub after: M,
}

impl<C, M> Configured<C, M> {
    /// How a partition resuming as `resume` is configured: with `current`, unless its
    /// checkpoint recorded another configuration (read with `parse`); then with that one,
    /// and a switch to `current` after `unknown`, a mark that nothing passes.
    pub fn resume(
        resume: &Resume<'_>,
        partition: i32,
        (current, current_text): (&Arc<C>, &str),
        parse: impl FnOnce(&str) -> anyhow::Result<C>,
        unknown: M,
    ) -> anyhow::Result<Self> {
        let Resume::Checkpoint { recorded_config: Some(recorded), .. } = resume else {
            return Ok(Configured { config: current.clone(), text: current_text.to_owned(), switch: None });
        };
        let old = parse(recorded).context("the configuration recorded in the checkpoint")?;
        tracing::warn!(
            partition,
            "configuration changed since the checkpoint: re-deriving what was already output with the recorded \
             one, then switching"
        );
        let switch = Switch { config: current.clone(), text: current_text.to_owned(), after: unknown };
        Ok(Configured { config: Arc::new(old), text: (*recorded).to_owned(), switch: Some(switch) })
    }

    /// Switches to the current configuration if the partition has `passed` the mark of what
    /// it already output, and returns it (the service rebuilds what depends on it).
    pub fn switch_if(&mut self, passed: impl FnOnce(&M) -> bool) -> Option<Arc<C>> {
        let sw = self.switch.take_if(|sw| passed(&sw.after))?;
        self.config = sw.config;
        self.text = sw.text;
        Some(self.config.clone())
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

    #[test]
    fn a_changed_configuration_runs_the_recorded_one_until_the_mark() {
        let current = Arc::new("new".to_owned());
        let parse = |t: &str| Ok(t.to_uppercase());
        let same = env("new", None);
        let c = Configured::<String, i64>::resume(&Resume::of(Some(&same), "new"), 0, (&current, "new"), parse, i64::MAX).unwrap();
        assert!(c.switch.is_none() && c.text == "new" && *c.config == "new");

        let changed = env("old", None);
        let mut c = Configured::resume(&Resume::of(Some(&changed), "new"), 0, (&current, "new"), parse, i64::MAX).unwrap();
        assert_eq!((c.text.as_str(), c.config.as_str()), ("old", "OLD"), "the recorded text, parsed");
        assert_eq!(c.switch.as_ref().map(|s| s.after), Some(i64::MAX));
        c.switch.as_mut().unwrap().after = 7;
        assert!(c.switch_if(|&after| 6 > after).is_none(), "not past the mark: no switch");
        assert_eq!(c.text, "old");
        assert_eq!(c.switch_if(|&after| 8 > after).as_deref().map(String::as_str), Some("new"));
        assert!(c.switch.is_none() && c.text == "new" && *c.config == "new");
        assert!(c.switch_if(|_| true).is_none(), "switches once");

        let bad = Configured::<String, i64>::resume(&Resume::of(Some(&changed), "new"), 0, (&current, "new"), |_| anyhow::bail!("no"), 0);
        assert!(bad.is_err(), "an unreadable recorded configuration fails the restore");
    }
}
