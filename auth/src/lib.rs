//! Turns credentials (API keys, OAuth2 bearer JWTs, client certificates) into a [`Principal`],
//! decides which streams it may produce to, limits failed attempts per source address, and
//! builds the TLS configuration of listeners.

pub mod apikey;
pub mod authn;
pub mod failures;
pub mod jwt;
pub mod mtls;
pub mod tls;

pub use authn::{Authenticator, Credentials, ListenerPolicy, OwnedCredentials};
// The vocabulary lives in core (so core does not depend on the TLS/JWT stack); re-exported for
// the code that reaches it through auth.
pub use sluice_core::{AuthFailure, FailureKind, Permissions, Principal, Swap, glob_match};
