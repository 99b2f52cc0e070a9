// The kernel's hash-map work of a new flow, alone: lb-bench's map-cost suite runs each program
// with `repeat = N`, every iteration on a key never used before (a counter), so that
// each iteration is a new flow's lookup miss or insert, and subtracts the floor (the counter
// alone). The maps have the shapes of lb_xdp's conntrack and reverse NAT (16-byte keys, 24- and
// 32-byte values, preallocated) and of Katran's flow cache (an LRU of 40-byte keys and 16-byte
// values); the loader sizes them. Built by build.sh (clang), not part of the product.
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))
#define ALWAYS __attribute__((always_inline)) static inline

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_delete_elem;

// lb-common's Ct4KeyV1, Ct4EntryV1 and RevNat4V1 (sizes only); Katran's flow_key and real_pos_lru.
struct flow { __u32 src, dst; __u16 sport, dport; __u8 proto, pad[3]; };
struct conntrack_entry { __u64 last_seen; __u32 words[4]; };
struct reverse_nat_entry { __u64 last_seen; __u32 words[6]; };
struct katran_flow { __u32 src[4], dst[4]; __u16 sport, dport; __u8 proto, pad[3]; };
struct katran_entry { __u32 pos, pad; __u64 atime; };

#define MAP(kind, name, k, v, size) struct { int (*type)[kind]; int (*max_entries)[size]; k *key; v *value; } name SEC(".maps")
// One counter for all CPUs: the runs may move between CPUs, the keys must stay new.
MAP(BPF_MAP_TYPE_ARRAY, counter, __u32, __u64, 1);
MAP(BPF_MAP_TYPE_HASH, conntrack, struct flow, struct conntrack_entry, 1024);
MAP(BPF_MAP_TYPE_HASH, reverse_nat, struct flow, struct reverse_nat_entry, 1024);
MAP(BPF_MAP_TYPE_LRU_HASH, katran_flows, struct katran_flow, struct katran_entry, 1024);
// Small enough to stay in the cache: what an insert costs when no memory access misses.
MAP(BPF_MAP_TYPE_HASH, small, struct flow, struct conntrack_entry, 64);

// The next unused flow: the counter through an odd multiplier (a bijection), so every
// iteration's key is new and the keys spread over the buckets.
ALWAYS int next_flow(struct flow *f) {
    __u32 zero = 0;
    __u64 *n = bpf_map_lookup_elem(&counter, &zero);
    if (!n) return 0;
    __u64 i = (*n)++;
    f->src = (__u32)i * 2654435761u;
    f->dst = 0x0100600a;
    f->sport = (__u16)(i >> 32);
    f->dport = 80;
    f->proto = 6;
    return 1;
}

ALWAYS void katran_key(const struct flow *f, struct katran_flow *k) {
    k->src[0] = f->src;
    k->dst[0] = f->dst;
    k->sport = f->sport;
    k->dport = f->dport;
    k->proto = f->proto;
}

#define PROGRAM(name, body) \
    SEC("xdp") int name(struct xdp_md *ctx) { \
        struct flow f = {}; \
        __attribute__((unused)) struct conntrack_entry ct = { 1 }; \
        __attribute__((unused)) struct reverse_nat_entry rnat = { 1 }; \
        if (!next_flow(&f)) return XDP_ABORTED; \
        body; \
        return XDP_PASS; \
    }

PROGRAM(floor_counter, )
PROGRAM(ct_lookup_miss, if (bpf_map_lookup_elem(&conntrack, &f)) return XDP_DROP)
PROGRAM(ct_insert, bpf_map_update_elem(&conntrack, &f, &ct, BPF_ANY))
PROGRAM(ct_lookup_insert, if (bpf_map_lookup_elem(&conntrack, &f)) return XDP_DROP; bpf_map_update_elem(&conntrack, &f, &ct, BPF_ANY))
PROGRAM(rnat_ct_insert, bpf_map_update_elem(&reverse_nat, &f, &rnat, BPF_ANY); bpf_map_update_elem(&conntrack, &f, &ct, BPF_ANY))
PROGRAM(ct_lookup_rnat_ct_insert, if (bpf_map_lookup_elem(&conntrack, &f)) return XDP_DROP; bpf_map_update_elem(&reverse_nat, &f, &rnat, BPF_ANY); bpf_map_update_elem(&conntrack, &f, &ct, BPF_ANY))
PROGRAM(ct_insert_delete, bpf_map_update_elem(&conntrack, &f, &ct, BPF_ANY); bpf_map_delete_elem(&conntrack, &f))
PROGRAM(small_insert_delete, bpf_map_update_elem(&small, &f, &ct, BPF_ANY); bpf_map_delete_elem(&small, &f))
PROGRAM(katran_lookup_insert, struct katran_flow k = {}; struct katran_entry e = { 1 }; katran_key(&f, &k); if (bpf_map_lookup_elem(&katran_flows, &k)) return XDP_DROP; bpf_map_update_elem(&katran_flows, &k, &e, BPF_ANY))

char _license[] SEC("license") = "GPL";
