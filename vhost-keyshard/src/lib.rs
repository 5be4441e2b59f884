//! keyshard's host side: the dealer and admin CLI `keyshard` (see [`cli`]); the fragment device
//! daemon and the coordinator join it later.

pub mod cli;
pub mod files;
