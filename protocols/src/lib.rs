//! Sluice's protocol adapters: each decodes its wire format, extracts credentials, calls
//! [`sluice_core::Ingest`], and renders receipts and rejections in its protocol's own terms.
//! No business logic lives here.

pub mod grpc;
pub mod http;
pub mod server;
