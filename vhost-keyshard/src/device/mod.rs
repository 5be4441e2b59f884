//! The virtio-blk device engine shared by every keyshard device: the feature bits and config
//! space ([`spec`]; the numbers it shares with the guest's frontend are in
//! `keyshard_core::virtio_blk`),
//! the medium behind a trait ([`media`]), request handling ([`request`]), the vhost-user
//! backend ([`backend`]) and the socket serving loop ([`serve`]).

pub mod backend;
pub mod media;
pub mod request;
pub mod serve;
pub mod spec;

#[cfg(test)]
mod tests;
