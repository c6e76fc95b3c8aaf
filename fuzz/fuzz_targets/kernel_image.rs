//! An image's kernel (an imported tree's /boot/vmlinuz-*): the LZ4 legacy
//! frames are decoded and the payload checked for an ELF header. Bounded
//! output; no panic on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(elf) = banger_guest::kernel::extract_vmlinux(data) {
        assert!(elf.starts_with(b"\x7fELF"));
    }
});
