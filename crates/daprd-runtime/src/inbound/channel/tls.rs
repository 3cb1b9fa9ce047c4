//! TLS to the app for `--app-protocol https|grpcs`. Like daprd, the app's certificate is
//! not verified (the app is local to the sidecar; the channel only needs encryption).

use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::ChannelError;

/// A rustls client config that accepts any server certificate, offering `alpn`.
///
/// # Errors
/// The TLS protocol versions could not be set up.
pub fn insecure_client_config(alpn: &[&[u8]]) -> Result<rustls::ClientConfig, ChannelError> {
    let mut config = daprd_core::tls::PemMaterial::default().client_config(true)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A tonic channel to `host:port` over TLS (HTTP/2 by ALPN), certificate not verified.
///
/// # Errors
/// TLS could not be set up.
pub fn grpcs_channel(host: &str, port: u16) -> Result<tonic::transport::Channel, ChannelError> {
    let config = Arc::new(insecure_client_config(&[b"h2"])?);
    let server_name = ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| ChannelError::address(host, e))?;
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
        .map_err(|e| ChannelError::address(host, e))?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}
