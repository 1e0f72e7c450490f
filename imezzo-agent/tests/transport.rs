//! Node identities on disk and pinned mutual TLS over real QUIC on 127.0.0.1.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    sync::{Mutex, Once},
    time::Duration,
};

use imezzo_agent::{
    identity::{Identity, IdentityError, NodeId, CERT_FILE, KEY_FILE},
    transport::{self, TransportError},
};

const DEADLINE: Duration = Duration::from_secs(20);

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Warnings the library logs, so a test can assert what the server's operator reads.
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct LogCapture;

impl log::Log for LogCapture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target().starts_with("imezzo_agent")
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = format!("{}: {}", record.level(), record.args());
            LOGGED.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&LogCapture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Warn);
    });
}

fn logged_containing(needle: &str) -> Vec<String> {
    LOGGED.lock().unwrap().iter().filter(|line| line.contains(needle)).cloned().collect()
}

#[test]
fn init_creates_private_identity_files_and_the_id_is_stable_across_load() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    let created = Identity::create(&state).unwrap();

    assert_eq!(mode(&state), 0o700, "state dir mode");
    assert_eq!(mode(&state.join(KEY_FILE)), 0o600, "key file mode");
    assert_eq!(mode(&state.join(CERT_FILE)), 0o644, "certificate file mode");
    let mut names: Vec<_> =
        fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, [CERT_FILE, KEY_FILE], "no temporary file left behind");

    let cert = fs::read(state.join(CERT_FILE)).unwrap();
    assert_eq!(created.id, NodeId::of_cert(&cert));
    let text = created.id.to_string();
    assert_eq!(text.len(), 64);
    assert!(text.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')), "{text}");

    let loaded = Identity::load(&state).unwrap();
    assert_eq!(loaded.id, created.id);
    assert_eq!(loaded.cert_der, created.cert_der);
    assert_eq!(loaded.key_der, created.key_der);
    assert_eq!(Identity::load(&state).unwrap().id, created.id);
}

#[test]
fn init_twice_refuses_and_keeps_the_first_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Identity::create(tmp.path()).unwrap();
    let key_before = fs::read(tmp.path().join(KEY_FILE)).unwrap();

    let err = Identity::create(tmp.path()).unwrap_err();

    assert!(matches!(err, IdentityError::AlreadyInitialised { id, .. } if id == first.id), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("already initialised, node id {}", first.id)), "{text}");
    assert_eq!(fs::read(tmp.path().join(KEY_FILE)).unwrap(), key_before);
    assert_eq!(Identity::load(tmp.path()).unwrap().id, first.id);
}

#[test]
fn load_from_a_missing_state_dir_tells_the_operator_to_run_init() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");

    let err = Identity::load(&missing).unwrap_err();

    assert!(matches!(err, IdentityError::NotInitialised { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("run `imezzo init --state {}`", missing.display())), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(!missing.exists(), "load must not create the state dir");
}

#[test]
fn load_from_a_file_given_as_state_dir_says_it_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    fs::write(&file, b"not a dir").unwrap();

    let load = Identity::load(&file).unwrap_err();
    let create = Identity::create(&file).unwrap_err();

    for err in [load, create] {
        assert!(matches!(err, IdentityError::StateNotDirectory { .. }), "{err:?}");
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}

#[test]
fn load_with_the_key_missing_names_the_node_and_the_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let created = Identity::create(tmp.path()).unwrap();
    fs::remove_file(tmp.path().join(KEY_FILE)).unwrap();

    let err = Identity::load(tmp.path()).unwrap_err();

    assert!(matches!(err, IdentityError::KeyMissing { id, .. } if id == created.id), "{err:?}");
    assert!(err.to_string().contains("restore the key"), "{err}");
}

#[test]
fn load_with_another_nodes_key_is_refused_as_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    Identity::create(tmp.path()).unwrap();
    fs::write(tmp.path().join(KEY_FILE), Identity::generate().unwrap().key_der).unwrap();

    let err = Identity::load(tmp.path()).unwrap_err();

    assert!(matches!(err, IdentityError::Corrupt { .. }), "{err:?}");
}

/// Two nodes with identities on disk, as `imezzo init` leaves them, loaded back.
fn two_nodes(tmp: &Path) -> (Identity, Identity) {
    let nodes = [tmp.join("server"), tmp.join("client")].map(|dir| {
        let created = Identity::create(&dir).unwrap();
        let loaded = Identity::load(&dir).unwrap();
        assert_eq!(loaded.id, created.id);
        loaded
    });
    let [server, client] = nodes;
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_client_and_server_exchange_a_message_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let (server_identity, client_identity) = two_nodes(tmp.path());
    let server = transport::server_endpoint(&server_identity, loopback(), vec![client_identity.id]).unwrap();
    let addr = server.local_addr().unwrap();

    let server_side = tokio::spawn(async move {
        let incoming = server.accept().await.expect("server endpoint open");
        let (conn, client_id) = transport::accept(incoming).await.expect("allowed client accepted");
        let peer_id = transport::peer_id(&conn);
        let (mut send, mut recv) = conn.accept_bi().await.expect("client opens a stream");
        let request = recv.read_to_end(1 << 20).await.expect("request read");
        send.write_all(b"reply from the server").await.expect("reply written");
        send.finish().expect("reply finished");
        // Stay up until the client has read the reply and closed.
        conn.closed().await;
        (client_id, peer_id, request)
    });

    let client = transport::client_endpoint(&client_identity).unwrap();
    let exchange = async {
        let conn = transport::connect(&client, addr, server_identity.id).await.expect("connects");
        assert_eq!(transport::peer_id(&conn), Some(server_identity.id), "client sees the server's id");
        let (mut send, mut recv) = conn.open_bi().await.expect("stream opened");
        send.write_all(b"request from the client").await.expect("request written");
        send.finish().expect("request finished");
        let reply = recv.read_to_end(1 << 20).await.expect("reply read");
        conn.close(0u32.into(), b"done");
        reply
    };
    let reply = tokio::time::timeout(DEADLINE, exchange).await.expect("exchange within the deadline");
    let (client_id, peer_id, request) =
        tokio::time::timeout(DEADLINE, server_side).await.expect("server within the deadline").unwrap();

    assert_eq!(reply, b"reply from the server");
    assert_eq!(request, b"request from the client");
    assert_eq!(client_id, client_identity.id, "accept returns the client's id");
    assert_eq!(peer_id, Some(client_identity.id), "server sees the client's id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_not_in_allow_is_refused_with_a_message_on_both_sides() {
    capture_logs();
    let server_identity = Identity::generate().unwrap();
    let client_identity = Identity::generate().unwrap();
    let someone_else = Identity::generate().unwrap().id;
    let server = transport::server_endpoint(&server_identity, loopback(), vec![someone_else]).unwrap();
    let addr = server.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let incoming = server.accept().await.expect("server endpoint open");
        transport::accept(incoming).await.map(|(_, id)| id)
    });

    let client = transport::client_endpoint(&client_identity).unwrap();
    let err = tokio::time::timeout(DEADLINE, transport::connect(&client, addr, server_identity.id))
        .await
        .expect("refusal within the deadline")
        .expect_err("a client not in --allow must be refused");

    let client_id = client_identity.id;
    assert!(matches!(err, TransportError::Refused { client, .. } if client == client_id), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("node id {client_id} is not in this server's --allow list")), "{text}");
    assert!(text.contains(&format!("--allow {client_id}")), "{text}");

    let server_err = tokio::time::timeout(DEADLINE, server_side).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(server_err, TransportError::ClientNotAllowed { .. }), "{server_err:?}");
    assert!(server_err.to_string().contains(&format!("node id {client_id} is not in")), "{server_err}");
    let warned = logged_containing(&format!("refused client {client_id}: not in --allow"));
    assert_eq!(warned.len(), 1, "one warning for the server's operator: {warned:?}");
    assert!(warned[0].starts_with("WARN"), "{warned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_expecting_another_server_id_refuses_the_server() {
    let server_identity = Identity::generate().unwrap();
    let client_identity = Identity::generate().unwrap();
    let expected = Identity::generate().unwrap().id;
    let server = transport::server_endpoint(&server_identity, loopback(), vec![client_identity.id]).unwrap();
    let addr = server.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let incoming = server.accept().await.expect("server endpoint open");
        transport::accept(incoming).await.map(|(_, id)| id)
    });

    let client = transport::client_endpoint(&client_identity).unwrap();
    let err = tokio::time::timeout(DEADLINE, transport::connect(&client, addr, expected))
        .await
        .expect("refusal within the deadline")
        .expect_err("a server with another id must be refused");

    assert!(
        matches!(err, TransportError::WrongServer { presented, expected: e, .. }
            if presented == server_identity.id && e == expected),
        "{err:?}"
    );
    let text = err.to_string();
    let wanted = format!("server presented node id {}, expected {expected}", server_identity.id);
    assert!(text.contains(&wanted), "{text}");

    // The server's operator is told too: the client's reason arrives with the close.
    let server_err = tokio::time::timeout(DEADLINE, server_side).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(server_err, TransportError::RefusedByClient { .. }), "{server_err:?}");
    assert!(server_err.to_string().contains(&wanted), "{server_err}");
}

fn imezzo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imezzo")).args(args).output().expect("imezzo runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn imezzo_init_prints_only_the_node_id_and_imezzo_id_prints_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let state_arg = state.to_str().unwrap();

    let init = imezzo(&["init", "--state", state_arg]);
    assert!(init.status.success(), "init failed: {}", text(&init.stderr));
    let printed = text(&init.stdout);
    assert_eq!(printed.lines().count(), 1, "stdout is the id alone: {printed:?}");
    let id: NodeId = printed.trim_end().parse().expect("stdout is a node id");
    assert_eq!(printed, format!("{id}\n"));
    assert_eq!(Identity::load(&state).unwrap().id, id);

    let again = imezzo(&["id", "--state", state_arg]);
    assert!(again.status.success(), "id failed: {}", text(&again.stderr));
    assert_eq!(text(&again.stdout), format!("{id}\n"));

    let second_init = imezzo(&["init", "--state", state_arg]);
    assert!(!second_init.status.success(), "a second init must fail");
    assert!(second_init.stdout.is_empty(), "{}", text(&second_init.stdout));
    assert!(
        text(&second_init.stderr).contains(&format!("already initialised, node id {id}")),
        "{}",
        text(&second_init.stderr)
    );
    assert_eq!(Identity::load(&state).unwrap().id, id, "the identity is unchanged");
}

#[test]
fn imezzo_id_on_a_missing_state_dir_says_to_run_init() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("garbage").join("state");
    let missing_arg = missing.to_str().unwrap();

    let out = imezzo(&["id", "--state", missing_arg]);

    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("run `imezzo init --state {missing_arg}`")), "{stderr}");
    assert!(!missing.exists(), "id must not create the state dir");
}
