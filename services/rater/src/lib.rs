//! meterflow-rater
