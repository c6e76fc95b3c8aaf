//! The header of a qcow2 root disk, which the VM's (unprivileged, maybe
//! hijacked) QEMU could rewrite before `vm commit` reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = banger_host::qcow2::check_header(data) {
        assert!((2..=3).contains(&h.version));
        assert_eq!(h.crypt_method, 0);
        assert_eq!(h.incompatible & (1 << 2), 0);
    }
});
