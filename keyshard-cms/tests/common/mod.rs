//! Harness shared by the store tests: a real etcd.
pub mod etcd;
