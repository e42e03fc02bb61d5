//! meterflow-producer
