//! Pod endpoints: the pods the CNI plugin (`lb-cni`) wired on this node, by address. The
//! agent lists them (`lbctl endpoint list`); NetworkPolicy and flow events read them to name a
//! pod and find its device.
use super::{Addr4, Addr6, MapAddr};

/// Hash `Endpoint4KeyV1 -> EndpointV1`: the IPv4 pods wired on this node.
pub const MAP_ENDPOINTS: &str = "LB4_EP_V1";
/// Hash `Endpoint6KeyV1 -> EndpointV1`: the IPv6 pods wired on this node.
pub const MAP_ENDPOINTS6: &str = "LB6_EP_V1";

/// Room for `namespace/name` of a pod: a namespace is a DNS label (63), a name a DNS
/// subdomain (253).
pub const POD_NAME_LEN: usize = 320;

/// A pod's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKeyV1<A: MapAddr> {
    pub addr: A,
}

pub type Endpoint4KeyV1 = EndpointKeyV1<Addr4>;
pub type Endpoint6KeyV1 = EndpointKeyV1<Addr6>;

/// Where a pod is and who it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointV1 {
    /// The host side of the pod's veth.
    pub ifindex: u32,
    /// Reserved (0): the pod's identity once NetworkPolicy lands.
    pub flags: u32,
    /// The pod side's MAC address.
    pub mac: [u8; 6],
    pub pod_len: u16,
    /// A hash of the CNI attachment (container ID and interface name): DEL and GC find the
    /// entries of an attachment with it after the pod's namespace is gone.
    pub attachment: u64,
    /// `namespace/name` from the runtime's `K8S_POD_NAMESPACE` and `K8S_POD_NAME` (empty
    /// when it gives none).
    pub pod: [u8; POD_NAME_LEN],
}

impl Default for EndpointV1 {
    fn default() -> Self {
        Self { ifindex: 0, flags: 0, mac: [0; 6], pod_len: 0, attachment: 0, pod: [0; POD_NAME_LEN] }
    }
}

impl EndpointV1 {
    /// Sets the pod's name, cut to `POD_NAME_LEN` bytes at a character boundary.
    pub fn set_pod(&mut self, pod: &str) {
        let pod = super::cut_to(pod, POD_NAME_LEN);
        self.pod = [0; POD_NAME_LEN];
        self.pod[..pod.len()].copy_from_slice(pod.as_bytes());
        self.pod_len = pod.len() as u16;
    }

    pub fn pod(&self) -> &str {
        let len = (self.pod_len as usize).min(POD_NAME_LEN);
        core::str::from_utf8(&self.pod[..len]).unwrap_or("<invalid utf-8>")
    }
}

#[cfg(feature = "user")]
super::impl_pod!(generic EndpointKeyV1);
#[cfg(feature = "user")]
super::impl_pod!(EndpointV1);

#[cfg(test)]
mod layout {
    use super::*;
    use crate::maps::assert_layout;

    #[test]
    fn endpoint() {
        assert_layout!(Endpoint4KeyV1, size 4, align 4, { addr @ 0 });
        assert_layout!(Endpoint6KeyV1, size 16, align 4, { addr @ 0 });
        assert_layout!(EndpointV1, size 344, align 8, { ifindex @ 0, flags @ 4, mac @ 8, pod_len @ 14, attachment @ 16, pod @ 24 });
    }

    #[test]
    fn pod_name_round_trips_and_truncates_on_char_boundary() {
        let mut e = EndpointV1::default();
        e.set_pod("default/web-0");
        assert_eq!(e.pod(), "default/web-0");
        // 3 bytes a unit: 106 units and the next `x` fit, the `é` after it does not.
        let long = "xé".repeat(200);
        e.set_pod(&long);
        assert_eq!(e.pod().len(), 319);
        assert!(long.starts_with(e.pod()));
    }
}
