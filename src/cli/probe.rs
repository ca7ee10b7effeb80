//! `jelou-worker probe-http URL`: a container health check without curl (the image
//! has no shell). Exits 0 when `GET URL` answers 200.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GETs a plain `http://host:port/path` URL; Ok when the status is 200.
pub async fn run(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).context("not a URL")?;
    if parsed.scheme() != "http" {
        bail!("only http:// URLs are probed");
    }
    let host = parsed.host_str().context("no host")?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n",
            parsed.path()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .context("no answer within 3 s")??;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{url} answered `{}`", head.lines().next().unwrap_or(""));
    }
    Ok(())
}
