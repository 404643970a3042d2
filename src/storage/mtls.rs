//! The S3 client's HTTP client when the store presents a TLS client certificate
//! (`tls-certificate`, `tls-private-key`: mTLS, as Nix 2.34's HTTP binary-cache store does).
//! The SDK's own client has no place for one, so this is a small one of the same parts
//! (hyper, rustls with the system's roots), which the SDK drives like its own; requests go
//! through it unchanged. Its timeouts are the SDK's (the operation timeouts) and narq's own
//! (`answered` in [`super::s3`]).

use std::path::Path;

use aws_smithy_runtime_api::client::http::{HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use hyper_util::client::legacy::{connect::HttpConnector as Tcp, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// An HTTP(S) client that presents a client certificate.
#[derive(Clone, Debug)]
pub struct MtlsClient {
    client: Client<hyper_rustls::HttpsConnector<Tcp>, SdkBody>,
}

impl MtlsClient {
    /// The client for the PEM certificate chain at `cert` and its key at `key` (which may be
    /// the same file); the error names the file and what is wrong with it.
    pub fn new(cert: &Path, key: &Path) -> Result<MtlsClient, String> {
        use hyper_rustls::ConfigBuilderExt;
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("tls-certificate {}: {e}", cert.display()))?;
        if certs.is_empty() {
            return Err(format!("tls-certificate {}: no PEM certificate in it", cert.display()));
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls-private-key {}: {e}", key.display()))?;
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_native_roots()
            .map_err(|e| format!("reading the system's root certificates: {e}"))?
            .with_client_auth_cert(certs, private)
            .map_err(|e| format!("tls-certificate {} with tls-private-key {}: {e}", cert.display(), key.display()))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_or_http().enable_http1().build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(MtlsClient { client })
    }
}

impl HttpConnector for MtlsClient {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let request = request.try_into_http1x().map_err(|e| ConnectorError::user(e.into()))?;
            let response = client.request(request).await.map_err(|e| ConnectorError::io(e.into()))?;
            let response = response.map(SdkBody::from_body_1_x);
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

impl HttpClient for MtlsClient {
    fn http_connector(&self, _settings: &HttpConnectorSettings, _components: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}
