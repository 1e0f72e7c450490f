//! Fetch streams: the master's current bytes and attributes, asked on the worker's behalf.

use super::*;

/// Most decoded messages of a data answer held ahead of its sink ([`Fetcher::data`]): each
/// `Data` is one read of the server's (`DATA_CHUNK`, 1 MiB), so about 4 MiB.
const DATA_AHEAD: usize = 4;

/// Requests to the server over fetch streams, usable from blocking threads.
#[derive(Clone)]
pub(crate) struct Fetcher {
    pub(super) conn: quinn::Connection,
    pub(super) rt: Handle,
    pub(super) next_id: Arc<AtomicU64>,
    /// Set by the first fetch that finds the connection gone.
    pub(super) lost: Arc<Mutex<Option<String>>>,
}

/// Why a fetch produced no answer.
#[derive(Debug)]
pub(crate) enum FetchFail {
    /// The connection is gone; the session reconnects.
    Lost(String),
    /// The server could not read it.
    Unreadable(String),
    /// Writing what arrived failed here.
    Local(io::Error),
}

/// How a data fetch ended.
pub(crate) enum DataEnd {
    Done { file_size: u64 },
    Gone,
}

impl Fetcher {
    pub(crate) fn runtime(&self) -> &Handle {
        &self.rt
    }

    pub(crate) fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn lose(&self, why: String) -> FetchFail {
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        l.get_or_insert(why.clone());
        FetchFail::Lost(why)
    }

    /// One exchange on a new stream: the request, then every checked event of the answer.
    pub(super) async fn exchange(
        &self,
        mut ex: FetchExchange,
        request: Msg,
        on_event: &mut (dyn FnMut(FetchEvent) -> Result<(), FetchFail> + Send),
    ) -> Result<(), FetchFail> {
        let mut recv = self.request(&request).await?;
        while let Some(events) = self.next_events(&mut ex, &mut recv).await? {
            for e in events {
                on_event(e)?;
            }
        }
        Ok(())
    }

    /// Opens a stream and sends `request` on it, finishing the send side; the answer comes
    /// on the returned receive side.
    async fn request(&self, request: &Msg) -> Result<quinn::RecvStream, FetchFail> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| self.lose(format!("connection lost ({e})")))?;
        let frame = protocol::encode(request)
            .map_err(|e| FetchFail::Local(io::Error::other(e.to_string())))?;
        send.write_all(&frame)
            .await
            .map_err(|e| self.lose(format!("connection lost ({e})")))?;
        let _ = send.finish();
        Ok(recv)
    }

    /// The checked events of the answer's next piece on `recv` (possibly none); `None` once
    /// the server finished the stream with the answer complete.
    async fn next_events(
        &self,
        ex: &mut FetchExchange,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<Vec<FetchEvent>>, FetchFail> {
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => ex
                .handle_stream_data(&chunk.bytes)
                .map(Some)
                .map_err(|r| self.violation(r)),
            Ok(None) => ex
                .handle_stream_finished()
                .map(|()| None)
                .map_err(|r| self.violation(r)),
            Err(e) => Err(self.lose(format!("a fetch stream failed ({e})"))),
        }
    }

    /// A server that broke the protocol on a fetch stream loses its connection.
    pub(super) fn violation(&self, reason: CloseReason) -> FetchFail {
        let text = reason.to_string();
        log::warn!("{text}");
        self.conn
            .close(quinn::VarInt::from_u32(reason.code()), text.as_bytes());
        self.lose(text)
    }

    /// The master's current bytes `[offset, offset + len)` of `path`, handed to `sink` as
    /// `(offset, bytes)` in increasing order; ranges not handed over are holes.
    pub(crate) async fn data(
        &self,
        path: RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
        sink: &mut (dyn FnMut(u64, &[u8]) -> io::Result<()> + Send),
    ) -> Result<DataEnd, FetchFail> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (mut ex, request) = FetchExchange::data(id, path, offset, len, ino);
        let mut recv = self.request(&request).await?;
        // The answer is read and decoded by a task on the runtime while the caller's thread
        // writes what came before (the sink's writes into the replica are the slow part):
        // read inline, a sink that lagged left the stream's bytes to pile up in quinn, which
        // past 2048 pieces copies all it holds into one fresh buffer, again and again (up to
        // a fifth of the client's CPU in a 2 GiB initial sync, mostly page faults). The
        // channel bounds what the task holds ahead of the sink to `DATA_AHEAD` messages;
        // past that it stops reading and the stream's flow control holds the server back.
        let (tx, mut rx) = mpsc::channel(DATA_AHEAD);
        let this = self.clone();
        self.rt.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = this.next_events(&mut ex, &mut recv) => next,
                    // The caller gave up (its sink failed, or it was dropped): dropping the
                    // stream stops it, even while the server sends nothing.
                    () = tx.closed() => return,
                };
                let events = match next {
                    Ok(Some(events)) => events,
                    Ok(None) => return,
                    Err(fail) => {
                        let _ = tx.send(Err(fail)).await;
                        return;
                    }
                };
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut end = None;
        while let Some(event) = rx.recv().await {
            match event? {
                FetchEvent::Data { offset, bytes } => {
                    sink(offset, &bytes).map_err(FetchFail::Local)?
                }
                FetchEvent::End { file_size } => end = Some(DataEnd::Done { file_size }),
                FetchEvent::Gone => end = Some(DataEnd::Gone),
                FetchEvent::Unreadable { reason } => return Err(FetchFail::Unreadable(reason)),
                FetchEvent::Attrs(..) | FetchEvent::Listing(_) | FetchEvent::ListingEnd { .. } => {}
            }
        }
        // The channel closes when the task ends: after the stream finished with the answer
        // complete, or after it sent the failure (or panicked: then `end` is missing).
        end.ok_or_else(|| FetchFail::Unreadable("the answer ended without DataEnd".into()))
    }

    /// The master's current attributes of `paths`.
    pub(crate) async fn attrs(&self, paths: Vec<RelPath>) -> Result<Vec<Option<Attrs>>, FetchFail> {
        Ok(self.attrs_asking(paths, false).await?.0)
    }

    /// The master's current attributes of `paths` and, for each multiply-linked
    /// non-directory, its other names (checked by [`FetchExchange`]; `None` where the
    /// server knows of no other link).
    pub(crate) async fn attrs_and_links(
        &self,
        paths: Vec<RelPath>,
    ) -> Result<Vec<(Option<Attrs>, Option<Links>)>, FetchFail> {
        let n = paths.len();
        let (attrs, links) = self.attrs_asking(paths, true).await?;
        let mut links = links.into_iter();
        Ok(attrs
            .into_iter()
            .map(|a| (a, links.next().flatten()))
            .take(n)
            .collect())
    }

    async fn attrs_asking(
        &self,
        paths: Vec<RelPath>,
        links: bool,
    ) -> Result<(Vec<Option<Attrs>>, Vec<Option<Links>>), FetchFail> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (ex, request) = FetchExchange::attrs(id, paths, links);
        let mut answer = None;
        self.exchange(ex, request, &mut |event| {
            match event {
                FetchEvent::Attrs(a, l) => answer = Some((a, l)),
                FetchEvent::Unreadable { reason } => return Err(FetchFail::Unreadable(reason)),
                _ => {}
            }
            Ok(())
        })
        .await?;
        answer.ok_or_else(|| FetchFail::Unreadable("the answer ended without Attrs".into()))
    }

    /// Starts fetching the listing of the directory `path` (its children, or its whole
    /// subtree when `recursive`): what arrives is handed over on the returned channel, in
    /// order, ending with [`Listed::End`], [`Listed::Gone`] or [`Listed::Failed`]. The channel
    /// is bounded, so a slow consumer stalls the stream rather than grow memory.
    pub(crate) fn listing(&self, path: RelPath, recursive: bool) -> mpsc::Receiver<Listed> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        self.rt.spawn(async move {
            if let Err(e) = this.stream_listing(path, recursive, &tx).await {
                let _ = tx.send(Listed::Failed(e)).await;
            }
        });
        rx
    }

    async fn stream_listing(&self, path: RelPath, recursive: bool, tx: &mpsc::Sender<Listed>) -> Result<(), FetchFail> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (mut ex, request) = FetchExchange::listing(id, path, recursive);
        let mut recv = self.request(&request).await?;
        while let Some(events) = self.next_events(&mut ex, &mut recv).await? {
            for event in events {
                let item = match event {
                    FetchEvent::Listing(entries) => Listed::Entries(entries),
                    FetchEvent::ListingEnd { seq } => Listed::End { seq },
                    FetchEvent::Gone => Listed::Gone,
                    FetchEvent::Unreadable { reason } => return Err(FetchFail::Unreadable(reason)),
                    _ => continue,
                };
                if tx.send(item).await.is_err() {
                    // The worker gave up on it: so does the stream.
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// What a listing fetch hands over, in order.
pub(crate) enum Listed {
    Entries(Vec<crate::protocol::ManifestEntry>),
    /// Complete; the listing shows the tree as of journal seq `seq` or later.
    End { seq: u64 },
    Gone,
    Failed(FetchFail),
}

/// Replay's [`DataSource`] over the connection: each call a blocking fetch.
pub(super) struct NetSource<'a> {
    pub(super) fetcher: &'a Fetcher,
    /// Answers fetched ahead for the current batch ([`Worker::prefetch`]).
    pub(super) cache: &'a HashMap<RelPath, Option<Attrs>>,
    /// Contents fetched ahead ([`Worker::prefetch_data`]).
    pub(super) data: &'a DataCache,
    /// (the entry's path, where its object is by now): asked about that path, the master
    /// is asked about the other name ([`Worker::later`]).
    pub(super) follow: Option<(RelPath, RelPath)>,
    /// Paths the master had nothing at when replay asked: what replay could not take
    /// from them is fetched later from wherever they went (see [`Pending`]).
    pub(super) absent: Vec<RelPath>,
}

impl<'a> NetSource<'a> {
    pub(super) fn new(fetcher: &'a Fetcher) -> NetSource<'a> {
        static NO_CACHE: std::sync::OnceLock<HashMap<RelPath, Option<Attrs>>> =
            std::sync::OnceLock::new();
        static NO_DATA: std::sync::OnceLock<DataCache> = std::sync::OnceLock::new();
        NetSource {
            fetcher,
            cache: NO_CACHE.get_or_init(HashMap::new),
            data: NO_DATA.get_or_init(HashMap::new),
            follow: None,
            absent: Vec::new(),
        }
    }

    /// The name the master is asked about for `path`: where [`NetSource::follow`] says the
    /// entry's object is by now, or `path` itself.
    fn asked<'p>(&'p self, path: &'p RelPath) -> &'p RelPath {
        match &self.follow {
            Some((from, to)) if from == path => to,
            _ => path,
        }
    }
}

pub(super) fn fail_to_io(f: FetchFail) -> io::Error {
    match f {
        FetchFail::Lost(why) => io::Error::new(io::ErrorKind::ConnectionAborted, why),
        FetchFail::Unreadable(why) => io::Error::other(format!("the server cannot read it: {why}")),
        FetchFail::Local(e) => e,
    }
}

impl DataSource for NetSource<'_> {
    fn read_range(
        &mut self,
        path: &RelPath,
        offset: u64,
        len: u64,
        ino: Option<u64>,
    ) -> io::Result<Vec<u8>> {
        let asked = self.asked(path);
        if let Some(pieces) = ino.and_then(|i| self.data.get(&(asked.clone(), i))) {
            if let Some(bytes) = pieces.iter().find_map(|p| p.slice(offset, len)) {
                return Ok(bytes.to_vec());
            }
        }
        let mut buf = Vec::new();
        let end = self.fetcher.rt.block_on(self.fetcher.data(
            asked.clone(),
            offset,
            len,
            ino,
            &mut |at, bytes| {
                // Holes between chunks read as zeros; replay turns zero blocks back into holes.
                let rel = usize::try_from(at - offset)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
                buf.resize(rel, 0);
                buf.extend_from_slice(bytes);
                Ok(())
            },
        ));
        match end.map_err(fail_to_io)? {
            DataEnd::Done { file_size } => {
                let want = offset
                    .saturating_add(len)
                    .min(file_size)
                    .saturating_sub(offset);
                buf.resize(
                    usize::try_from(want).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?,
                    0,
                );
                Ok(buf)
            }
            // Another file there now: replay leaves the path to be fetched again from
            // wherever the written file went.
            DataEnd::Gone if ino.is_some() => Err(crate::replay::replaced(path)),
            // Nothing there now: a later entry (unlink, rename) accounts for it.
            DataEnd::Gone => Ok(Vec::new()),
        }
    }

    fn attrs(&mut self, path: &RelPath) -> io::Result<Option<Attrs>> {
        let asked = self.asked(path);
        let attrs = match self.cache.get(asked) {
            Some(a) => a.clone(),
            None => {
                let mut answer = self
                    .fetcher
                    .rt
                    .block_on(self.fetcher.attrs(vec![asked.clone()]))
                    .map_err(fail_to_io)?;
                answer.pop().flatten().map(Attrs::from)
            }
        };
        if attrs.is_none() {
            self.absent.push(path.clone());
        }
        Ok(attrs)
    }
}
