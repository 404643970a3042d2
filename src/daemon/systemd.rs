//! systemd activation: the socket it passes (`LISTEN_FDS`) and readiness (`sd_notify`).

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;

pub(super) fn systemd_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let fds: u32 = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if !pid_ok || fds == 0 {
        return Ok(None);
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: systemd passes the listening sockets as fds 3.., owned by us from here on.
    let l = unsafe { StdUnixListener::from_raw_fd(3) };
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Tells systemd (`Type=notify`) that we serve, if it asked.
pub(super) fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return tracing::warn!("sd_notify: {e}"),
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify to {}: {e}", path.to_string_lossy());
    }
}
