//! TLS to the app for `--app-protocol https|grpcs`. Like daprd, the app's certificate is
//! not verified (the app is local to the sidecar; the channel only needs encryption).

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
    crate::tls::grpc_channel(host, port, insecure_client_config(&[])?)
        .map_err(|e| ChannelError::address(host, e))
}
