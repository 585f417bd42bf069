#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| understudy_fuzz::http_framer(data));
