//! Batched map operations (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`): one system call for thousands of entries where aya makes one per
//! entry. Maglev tables are written, conntrack is collected and counters are read with them.
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries per lookup call: large enough that a 100k-entry map takes a few dozen calls.
const LOOKUP_CHUNK: usize = 4096;

pub(crate) fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    // SAFETY: `attr` is a fully initialised bpf_attr whose pointers the caller keeps alive.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, size_of::<bpf_attr>() as libc::c_long) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn batch_attr(map: &MapData, keys: *const u8, values: *const u8, count: usize) -> bpf_attr {
    // SAFETY: bpf_attr is plain data; all-zero is its documented "unset".
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.count = count as u32;
    attr
}

/// Writes `values[i]` at `keys[i]` for every i, in as few calls as the kernel allows.
pub fn update<K: aya::Pod, V: aya::Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    update_each(map, keys, values, 1)
}

/// `values` holds `per_key` values for each key, in key order.
fn update_each<K: aya::Pod, V: aya::Pod>(map: &MapData, keys: &[K], values: &[V], per_key: usize) -> io::Result<()> {
    assert_eq!(keys.len() * per_key, values.len(), "{per_key} values per key");
    let mut done = 0;
    while done < keys.len() {
        let mut attr = batch_attr(map, keys[done..].as_ptr().cast(), values[done * per_key..].as_ptr().cast(), keys.len() - done);
        sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr)?;
        // SAFETY: the kernel wrote back how many it processed.
        let processed = unsafe { attr.batch.count } as usize;
        if processed == 0 {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH processed no entry"));
        }
        done += processed;
    }
    Ok(())
}

/// Removes `keys` (a missing key is not an error: one removed meanwhile by the datapath).
pub fn delete<K: aya::Pod>(map: &MapData, keys: &[K]) -> io::Result<()> {
    let mut done = 0;
    while done < keys.len() {
        let mut attr = batch_attr(map, keys[done..].as_ptr().cast(), std::ptr::null(), keys.len() - done);
        let result = sys_bpf(bpf_cmd::BPF_MAP_DELETE_BATCH, &mut attr);
        // SAFETY: the kernel wrote back how many it processed.
        let processed = unsafe { attr.batch.count } as usize;
        match result {
            Ok(()) => done += processed.max(1),
            // The key at `done + processed` is gone already: step past it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += processed + 1,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Every (key, value) of a map. `V` is the whole value as the kernel copies it out: for a
/// per-CPU map, one 8-byte-aligned value per possible CPU.
pub fn lookup_all<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    // SAFETY: each slice holds exactly one K and one V as the kernel wrote them; Pod types are
    // valid for any bytes.
    lookup_each(map, size_of::<K>(), size_of::<V>(), |k, v| out.push(unsafe { (std::ptr::read_unaligned(k.as_ptr().cast()), std::ptr::read_unaligned(v.as_ptr().cast())) }))?;
    Ok(out)
}

/// How many entries a map holds, counted in batches (keys and values of the given sizes).
pub fn count(map: &MapData, key_size: usize, value_size: usize) -> io::Result<usize> {
    let mut n = 0;
    lookup_each(map, key_size, value_size, |_, _| n += 1)?;
    Ok(n)
}

/// Calls `each` with the bytes of every key and value, `LOOKUP_CHUNK` entries a call.
fn lookup_each(map: &MapData, key_size: usize, value_size: usize, mut each: impl FnMut(&[u8], &[u8])) -> io::Result<()> {
    let mut keys = vec![0u8; key_size * LOOKUP_CHUNK];
    let mut values = vec![0u8; value_size * LOOKUP_CHUNK];
    // The position token: a u32 for arrays and hash maps; 8 bytes leaves room.
    let mut token = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = batch_attr(map, keys.as_mut_ptr(), values.as_mut_ptr(), LOOKUP_CHUNK);
        attr.batch.in_batch = if first { 0 } else { token.as_ptr() as u64 };
        attr.batch.out_batch = token.as_mut_ptr() as u64;
        let result = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel wrote back how many entries it copied.
        let copied = unsafe { attr.batch.count } as usize;
        let end = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        for i in 0..copied {
            each(&keys[i * key_size..(i + 1) * key_size], &values[i * value_size..(i + 1) * value_size]);
        }
        if end {
            return Ok(());
        }
        first = false;
    }
}
