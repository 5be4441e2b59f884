//! Shared by the TPM tests here and the coordinator and CLI tests of `keyshard`, which include
//! this directory's files by path: a throw-away swtpm.

#![allow(dead_code)]

pub mod swtpm;
pub mod timing;
