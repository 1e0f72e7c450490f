//! How many connections the server holds at once: at most [`PER_NODE`] per client node id
//! and [`TOTAL`] in all, so an authenticated but hostile (or looping) client cannot make the
//! server hold memory without bound. Each admitted connection holds a [`Slot`] until it ends;
//! an extra one is closed with `Refused` and a text saying why.

use std::{collections::HashMap, sync::Mutex};

use crate::identity::NodeId;

/// Connections one client node may have open at once: one in use, and room for a few that a
/// restarted client left behind until they time out.
pub const PER_NODE: usize = 4;
/// Connections the server holds at once, over all clients.
pub const TOTAL: usize = 64;
/// Handshakes (not yet authenticated) the server runs at once; more are refused by QUIC
/// before any TLS work.
pub const HANDSHAKES: usize = 128;

#[derive(Default)]
pub(super) struct Admission {
    open: Mutex<HashMap<NodeId, usize>>,
}

/// One admitted connection; dropping it frees the place.
pub(super) struct Slot<'a> {
    admission: &'a Admission,
    id: NodeId,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, usize>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for one more connection of `id`, or why there is none.
    pub(super) fn admit(&self, id: NodeId) -> Result<Slot<'_>, String> {
        let mut open = self.lock();
        let of_node = open.get(&id).copied().unwrap_or(0);
        if of_node >= PER_NODE {
            return Err(format!(
                "node {id} already has {of_node} connections to this server (at most {PER_NODE} per node)"
            ));
        }
        let total: usize = open.values().sum();
        if total >= TOTAL {
            return Err(format!("this server already holds {total} connections (at most {TOTAL})"));
        }
        *open.entry(id).or_insert(0) += 1;
        Ok(Slot { admission: self, id })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        if let Some(n) = open.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_gets_per_node_places_and_gets_one_back_when_a_connection_ends() {
        let a = Admission::default();
        let id = NodeId::from_bytes([1; 32]);
        let slots: Vec<_> = (0..PER_NODE).map(|_| a.admit(id).unwrap()).collect();
        let refused = a.admit(id).err().unwrap();
        assert!(refused.contains("at most 4 per node"), "{refused}");
        // Another node is not affected.
        let other = a.admit(NodeId::from_bytes([2; 32])).unwrap();
        drop(slots);
        drop(other);
        assert!(a.lock().is_empty());
        let _again = a.admit(id).unwrap();
    }

    #[test]
    fn the_total_is_bounded_over_all_nodes() {
        let a = Admission::default();
        let slots: Vec<_> = (0..TOTAL).map(|i| a.admit(NodeId::from_bytes([i as u8; 32])).unwrap()).collect();
        assert!(a.admit(NodeId::from_bytes([255; 32])).err().unwrap().contains("at most 64"));
        assert_eq!(slots.len(), TOTAL);
    }
}
