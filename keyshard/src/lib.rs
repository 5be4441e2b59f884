//! `keyshard`, the composition root of the host side: the dealer and admin CLI ([`cli`]) that
//! wires the coordinator (`keyshard-coordinator`), the TPM (`keyshard-tpm`), the attestation
//! checks (`keyshard-attest`) and the device engine (`vhost-keyshard`) into subcommands.

pub mod cli;
