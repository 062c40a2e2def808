//! The IPC universe of the session tutorial (`session_server`, `session_client`): built by this
//! one piece of code, which both programs include, so both sides see the same values.
#![allow(dead_code)] // each program uses its part

use std::path::PathBuf;

use flowipc::session::{App, ClientApp, ClientApps, Error, ServerApp};

/// Where the two programs are: next to each other (cargo puts examples in one directory).
fn exe(name: &str) -> Result<PathBuf, Error> {
    let me = std::env::current_exe().map_err(Error::Io)?;
    Ok(me.with_file_name(name))
}

/// The universe: the server app `tut_srv` (the `session_server` program) accepts the client
/// app `tut_cli` (the `session_client` program); both run as this user. The run dir is the
/// default one unless `FLOWIPC_RUN_DIR` says otherwise.
pub struct Universe {
    pub server: ServerApp,
    pub client: ClientApp,
    pub clients: ClientApps,
}

pub fn build() -> Result<Universe, Error> {
    // Both programs run as this process's user and group (`App::current` has them).
    let srv = App {
        exec_path: exe("session_server")?,
        ..App::current("tut_srv")?
    };
    let cli = App {
        exec_path: exe("session_client")?,
        ..App::current("tut_cli")?
    };
    let client = ClientApp::new(cli);
    let mut server = ServerApp::new(srv, [client.name.clone()]);
    if let Some(dir) = std::env::var_os("FLOWIPC_RUN_DIR") {
        server = server.run_dir(dir);
    }
    let clients = ClientApp::master_set([&client]);
    Ok(Universe {
        server,
        client,
        clients,
    })
}
