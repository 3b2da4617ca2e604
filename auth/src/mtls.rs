//! Verified client certificates to principals: the first rule whose pattern matches the
//! certificate's SAN URI, SAN DNS name or subject CN decides the principal and its streams.

use sluice_config::{CertField, MtlsRule};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{AuthFailure, Permissions, Principal, glob_match};

/// The configured mapping rules.
pub struct MtlsMapper {
    rules: Vec<MtlsRule>,
}

/// The values of `field` in a certificate.
fn values(cert: &X509Certificate<'_>, field: CertField) -> Vec<String> {
    match field {
        CertField::Cn => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect(),
        CertField::SanUri | CertField::SanDns => {
            let Ok(Some(san)) = cert.subject_alternative_name() else {
                return Vec::new();
            };
            san.value
                .general_names
                .iter()
                .filter_map(|n| match (n, field) {
                    (GeneralName::URI(u), CertField::SanUri) => Some(u.to_string()),
                    (GeneralName::DNSName(d), CertField::SanDns) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        }
    }
}

/// The names of a client certificate that MQTT topic rules can bind to (docs/mqtt.md
/// "Device-bound topics").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    pub cn: Vec<String>,
    pub san_dns: Vec<String>,
    pub san_uri: Vec<String>,
}

/// The names of a client certificate (DER) that TLS already verified; `None` if it cannot be
/// parsed.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(CertNames {
        cn: values(&cert, CertField::Cn),
        san_dns: values(&cert, CertField::SanDns),
        san_uri: values(&cert, CertField::SanUri),
    })
}

impl MtlsMapper {
    pub fn new(rules: &[MtlsRule]) -> Self {
        Self {
            rules: rules.to_vec(),
        }
    }

    /// The principal of a client certificate (DER) that TLS already verified.
    pub fn map(&self, der: &[u8]) -> Result<Principal, AuthFailure> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| {
            AuthFailure::new(
                "mtls",
                "malformed",
                "the client certificate cannot be parsed",
            )
        })?;
        for rule in &self.rules {
            for v in values(&cert, rule.field) {
                if glob_match(&rule.pattern, &v) {
                    let name = rule
                        .principal
                        .as_deref()
                        .map_or_else(|| v.clone(), |p| p.replace("{value}", &v));
                    return Ok(
                        Principal::new(name, Permissions::Streams(rule.streams.clone()))
                            .consuming(Permissions::Streams(rule.consume.clone()))
                            .with_source("mtls"),
                    );
                }
            }
        }
        Err(AuthFailure::new(
            "mtls",
            "no_matching_rule",
            "the client certificate matches no mTLS mapping rule",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule's `streams` grant producing and its `consume` grant reading, apart.
    #[test]
    fn a_rule_grants_producing_and_reading_apart() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["meter-7.devices.test".to_string()]).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let mapper = MtlsMapper::new(&[MtlsRule {
            field: CertField::SanDns,
            pattern: "*.devices.test".into(),
            principal: Some("device:{value}".into()),
            streams: vec!["telemetry".into()],
            consume: vec!["commands".into()],
        }]);
        let p = mapper.map(&der).unwrap();
        assert_eq!(p.name(), "device:meter-7.devices.test");
        assert!(p.may_produce_to("telemetry") && !p.may_produce_to("commands"));
        assert!(p.may_consume("commands") && !p.may_consume("telemetry"));
    }
}
