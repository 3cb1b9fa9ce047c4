//! gRPC over rustls: the one way this runtime opens a TLS gRPC channel (to a `grpcs` app, to
//! an OTLP collector with `isSecure`), whatever the certificate policy of the caller.

use std::sync::Arc;

use rustls::pki_types::ServerName;

/// Why a TLS gRPC channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsChannelError {
    /// `host` is not a DNS name or an IP address.
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
    /// `host:port` does not make a URI.
    #[error("{0} does not make a valid endpoint: {1}")]
    Endpoint(String, tonic::transport::Error),
}

/// A lazily connected tonic channel to `host:port` (a bracketed IPv6 literal is fine) over
/// TLS with `config`, HTTP/2 offered by ALPN.
///
/// # Errors
/// `host` is not a server name, or the address does not make a URI.
pub fn grpc_channel(
    host: &str,
    port: u16,
    mut config: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, TlsChannelError> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(bare.to_string())
        .map_err(|_| TlsChannelError::ServerName(bare.to_string()))?;
    let addr = format!("{host}:{port}");
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
        .map_err(|e| TlsChannelError::Endpoint(format!("{host}:{port}"), e))?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}
