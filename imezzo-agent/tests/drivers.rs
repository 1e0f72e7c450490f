//! The server and client drivers together in one process: real probes, real QUIC on
//! 127.0.0.1, export and replica on two fresh tmpfs mounts, `verify` as the judge.
//!
//! Runs as root against the real kernel (CI runs it as root; it fails, never skips). The
//! changes a test makes while the server runs come from child processes (`sh`): capture
//! ignores the agent's own process, which here is the test itself.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use imezzo_agent::{
    client::{self, ClientError, ClientEvent, StateFile},
    config::{ClientOptions, Mode, ServerOptions},
    identity::{Identity, NodeId},
    op::Op,
    protocol::ClientState,
    server::Server,
    transport::TransportError,
    verify::{self, VerifyOptions},
};
use tokio::sync::oneshot;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Probes and mounts are kernel state shared by every test of this binary: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: PathBuf) -> Tmpfs {
        fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&dir).status().unwrap();
        assert!(st.success(), "mounting a tmpfs on {} failed (tests run as root)", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

fn sh(script: &str) {
    let out = Command::new("sh").arg("-ec").arg(script).output().unwrap();
    assert!(out.status.success(), "sh -ec {script:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

struct RunningClient {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ClientError>>,
}

/// A server and (at times) a client, each with its own state dir.
struct Pair {
    rt: tokio::runtime::Runtime,
    // Field order: the mounts go after the runtime's tasks are dropped with it.
    export: Tmpfs,
    replica: Tmpfs,
    client_state: PathBuf,
    addr: std::net::SocketAddr,
    server_id: NodeId,
    stop_server: Option<oneshot::Sender<()>>,
    server_task: Option<tokio::task::JoinHandle<Result<(), imezzo_agent::server::ServerError>>>,
    events_tx: mpsc::Sender<ClientEvent>,
    events: mpsc::Receiver<ClientEvent>,
    seen: Vec<String>,
    client: Option<RunningClient>,
    _base: tempfile::TempDir,
}

impl Pair {
    /// Mounts both trees, lets `populate` fill the export, then starts the server.
    fn new(tag: &str, populate: impl FnOnce(&Path)) -> Pair {
        let base = tempfile::Builder::new().prefix(&format!("imezzo-drivers-{tag}-")).tempdir().unwrap();
        let export = Tmpfs::new(base.path().join("export"));
        let replica = Tmpfs::new(base.path().join("replica"));
        let server_state = base.path().join("server-state");
        let client_state = base.path().join("client-state");
        let server_identity = Identity::create(&server_state).unwrap();
        let client_identity = Identity::create(&client_state).unwrap();
        populate(&export.0);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let opts = ServerOptions {
            export: export.0.clone(),
            state: server_state.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            allow: vec![client_identity.id],
            retain_bytes: 64 << 20,
        };
        let server = rt.block_on(Server::start(&opts)).expect("the server starts (root, BTF kernel)");
        let addr = server.local_addr();
        assert_eq!(server.node_id(), server_identity.id);
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server_task = rt.spawn(server.run(async {
            let _ = stopped.await;
        }));
        let (events_tx, events) = mpsc::channel();
        Pair {
            rt,
            export,
            replica,
            client_state,
            addr,
            server_id: server_identity.id,
            stop_server: Some(stop_server),
            server_task: Some(server_task),
            events_tx,
            events,
            seen: Vec::new(),
            client: None,
            _base: base,
        }
    }

    fn client_options(&self, server_id: NodeId) -> ClientOptions {
        ClientOptions {
            server: self.addr,
            server_id,
            root: self.replica.0.clone(),
            state: self.client_state.clone(),
            mode: Mode::Replicate,
        }
    }

    fn start_client(&mut self) {
        let opts = self.client_options(self.server_id);
        let tx = Mutex::new(self.events_tx.clone());
        let sink: client::EventSink = Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = self.rt.spawn(async move {
            client::run(&opts, sink, async {
                let _ = stopped.await;
            })
            .await
        });
        self.client = Some(RunningClient { stop, task });
    }

    /// Stops the client cleanly; it must end without an error.
    fn stop_client(&mut self) {
        let c = self.client.take().expect("a client runs");
        let _ = c.stop.send(());
        let r = self.rt.block_on(async { tokio::time::timeout(TIMEOUT, c.task).await });
        match r {
            Ok(Ok(Ok(()))) => {}
            other => panic!("the client did not stop cleanly: {other:?}\nevents: {:#?}", self.seen),
        }
    }

    /// The first event matching `want`, failing after [`TIMEOUT`]; events before it are kept
    /// in `seen` for the failure messages.
    fn wait_event(&mut self, what: &str, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(format!("{e:?}"));
                    if want(&e) {
                        return e;
                    }
                }
                Err(_) => panic!("no {what} within {TIMEOUT:?}; events: {:#?}", self.seen),
            }
        }
    }

    /// The highest seq applied: `last`'s, or that of an `Applied` event still queued after
    /// it (read once the client has stopped, so the queue is whole).
    fn seen_applied_through(&mut self, last: ClientEvent) -> u64 {
        let ClientEvent::Applied { seq, .. } = last else { panic!("not an Applied event: {last:?}") };
        let mut through = seq;
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(format!("{e:?}"));
            if let ClientEvent::Applied { seq, .. } = e {
                through = through.max(seq);
            }
        }
        through
    }

    fn wait_identical(&self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let opts = VerifyOptions::default();
        loop {
            let diffs = verify::compare(&self.export.0, &self.replica.0, &opts).unwrap();
            if diffs.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let list: Vec<String> = diffs.iter().take(30).map(|d| d.to_string()).collect();
                panic!(
                    "{what}: the replica still differs after {TIMEOUT:?}:\n{}\nevents: {:#?}",
                    list.join("\n"),
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.stop.send(());
            let _ = self.rt.block_on(async { tokio::time::timeout(TIMEOUT, c.task).await });
        }
        if let Some(s) = self.stop_server.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.server_task.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout(TIMEOUT, t).await });
        }
    }
}

fn populate_varied_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::write(root.join("a/one.txt"), b"one\n").unwrap();
    fs::write(root.join("a/b/two.txt"), vec![b'2'; 200_000]).unwrap();
    // Sparse: 1 MiB hole, then data.
    let f = fs::File::create(root.join("a/b/c/sparse.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", 1 << 20).unwrap();
    fs::hard_link(root.join("a/one.txt"), root.join("a/b/one-again.txt")).unwrap();
    std::os::unix::fs::symlink("../one.txt", root.join("a/b/link-to-one")).unwrap();
    fs::set_permissions(root.join("a/b/two.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(root.join("a/b"), Some(1234), Some(5678)).unwrap();
    let c = |p: &str| std::ffi::CString::new(root.join(p).into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid C strings and buffers.
    unsafe {
        assert_eq!(libc::mkfifo(c("a/fifo").as_ptr(), 0o620), 0, "mkfifo");
        let v = b"blue";
        assert_eq!(libc::setxattr(c("a/one.txt").as_ptr(), c"user.color".as_ptr(), v.as_ptr().cast(), v.len(), 0), 0);
    }
}

#[test]
fn a_tree_on_the_server_and_files_created_later_appear_identical_on_the_client() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut p = Pair::new("sync", populate_varied_tree);
    p.start_client();
    let done = p.wait_event("initial sync", |e| matches!(e, ClientEvent::InitialSyncDone { .. }));
    let ClientEvent::InitialSyncDone { stats, .. } = done else { unreachable!() };
    // one.txt (4 bytes) travels in the manifest; two.txt (200 kB) and sparse.img (1 MiB
    // apparent) are over the inline limit and fetched.
    assert_eq!((stats.inlined_files, stats.fetched_files), (1, 2), "{stats:?}");
    p.wait_identical("after the initial sync");

    sh(&format!(
        "cd {r} && mkdir -p live/deep && for i in 1 2 3 4 5 6 7 8; do echo file $i > live/f$i; done \
         && dd if=/dev/urandom of=live/deep/big bs=64k count=40 2>/dev/null && mv live/f1 live/deep/moved \
         && chmod 600 live/f2 && rm live/f3 && ln live/f4 live/f4-link && mv a/b a/b-renamed \
         && printf 'saved whole, then renamed over the old one\\n' > live/.f5.tmp && mv live/.f5.tmp live/f5",
        r = p.export.0.display()
    ));
    p.wait_identical("after live changes");
    p.wait_event("in sync", |e| matches!(e, ClientEvent::InSync { .. }));
}

#[test]
fn a_restarted_client_resumes_from_its_last_applied_seq_without_a_full_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut p = Pair::new("resume", |root| fs::write(root.join("first"), b"1").unwrap());
    p.start_client();
    p.wait_event("initial sync", |e| matches!(e, ClientEvent::InitialSyncDone { .. }));
    sh(&format!("cd {} && echo two > second && mkdir d && echo three > d/third", p.export.0.display()));
    p.wait_identical("before the restart");
    p.wait_event("in sync", |e| matches!(e, ClientEvent::InSync { .. }));
    p.stop_client();
    let state = StateFile::new(&p.client_state).load().unwrap();
    let Some(last) = state.last_applied else { panic!("no last applied seq after a clean stop: {state:?}") };
    assert!(last >= 1, "changes were applied before the stop: {state:?}");

    // Changes while the client is away: the journal holds them.
    sh(&format!("cd {} && echo four > d/fourth && rm second && mv d e", p.export.0.display()));
    p.start_client();
    let first = p.wait_event("the server's welcome", |e| {
        matches!(e, ClientEvent::Resumed { .. } | ClientEvent::FullSyncStarted { .. })
    });
    match first {
        ClientEvent::Resumed { from_seq } => assert_eq!(from_seq, last + 1, "resumes right after the durable seq"),
        other => panic!("a restarted client resyncs in full instead of resuming: {other:?}"),
    }
    p.wait_identical("after the restart");
}

#[test]
fn a_clean_stop_right_after_an_apply_keeps_every_applied_seq_durable() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut p = Pair::new("clean-stop", |_| {});
    p.start_client();
    p.wait_event("initial sync", |e| matches!(e, ClientEvent::InitialSyncDone { .. }));
    // Two batches a few ms apart: the first is made durable at once, the second's durable
    // point is put off (a client syncs at most once per 25 ms), and the stop comes inside
    // that wait, right after the second batch is applied.
    sh(&format!("cd {} && echo one > first && sleep 0.008 && echo two > last", p.export.0.display()));
    let last = p.wait_event("the last file applied", |e| {
        matches!(e, ClientEvent::Applied { op: op @ Op::Write { .. }, .. } if op.path().as_bytes() == b"last")
    });
    p.stop_client();
    let applied = p.seen_applied_through(last);
    let state = StateFile::new(&p.client_state).load().unwrap();
    assert_eq!(
        state.last_applied,
        Some(applied),
        "a clean stop leaves every applied entry durable\nevents: {:#?}",
        p.seen
    );
}

#[test]
fn a_client_with_the_wrong_server_id_stops_with_an_error_naming_both_ids() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let p = Pair::new("refused", |_| {});
    let wrong = Identity::generate().unwrap().id;
    let opts = p.client_options(wrong);
    let sink: client::EventSink = Arc::new(|_| {});
    let r =
        p.rt.block_on(async { tokio::time::timeout(TIMEOUT, client::run(&opts, sink, std::future::pending())).await });
    match r {
        Ok(Err(ClientError::Refused(TransportError::WrongServer { presented, expected, .. }))) => {
            assert_eq!((presented, expected), (p.server_id, wrong));
        }
        other => panic!("want a refusal naming the server's id, got {other:?}"),
    }
}

#[test]
fn the_client_state_survives_a_round_trip_and_damage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = StateFile::new(dir.path());
    assert_eq!(file.load().unwrap(), ClientState::default(), "no file: a new client");
    let s = ClientState { volume_id: Some([7; 16]), last_applied: Some(42) };
    file.store(&s).unwrap();
    assert_eq!(file.load().unwrap(), s);
    let mid_sync = ClientState { volume_id: Some([7; 16]), last_applied: None };
    file.store(&mid_sync).unwrap();
    assert_eq!(file.load().unwrap(), mid_sync);
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [std::ffi::OsString::from(client::STATE_FILE)], "no temporary left");
    fs::write(file.path(), "volume zz\nlast_applied 3\n").unwrap();
    assert!(matches!(file.load(), Err(ClientError::StateCorrupt { .. })));
}
