//! Every end-to-end test in one binary (one link instead of one per file): each module starts
//! the real gateway on 127.0.0.1:0 and drives it with real clients; docs/testing.md lists what
//! each module proves and the real parts it starts.

mod attacks;
mod auth;
mod browser;
mod clients;
mod cloudevents;
mod consume;
mod crash;
mod deploy;
mod envelope;
mod exactly_once;
mod fleet;
mod grpc;
mod grpc_python;
mod http;
mod inproc;
mod kafka;
mod kafka_faults;
mod kafka_rest;
mod lifecycle;
mod mqtt;
mod mqtt_clients;
mod mqtt_fleet;
mod operations;
mod proxy;
mod quotas;
mod reload;
mod schema_formats;
mod schemas;
mod spool;
mod traces;
mod websocket;
