//! meterflow-aggregator
