//! A DNS query a guest sends banger's DNS on its gateway: parsed with
//! hickory-proto and answered, forwarded or dropped. An answer always
//! parses and carries the query's id.
#![no_main]

use std::net::Ipv4Addr;

use bangerd::dns::{plan, Plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let lookup = |n: &str| (n == "web").then_some(Ipv4Addr::new(172, 30, 0, 6));
    if let Plan::Reply(r) = plan(data, "vm", &lookup) {
        let m = hickory_proto::op::Message::from_vec(&r).expect("our reply parses");
        let q = hickory_proto::op::Message::from_vec(data).expect("the query parsed");
        assert_eq!(m.metadata.id, q.metadata.id);
    }
});
