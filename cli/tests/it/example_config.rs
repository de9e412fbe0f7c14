//! `configs/daemon/m31r.toml`, the example config the README points at, shows every daemon key
//! with its default.

#[test]
fn example_config_documents_every_key_with_its_default() {
    use m31r_daemon::config::DaemonConfig;
    #[derive(serde::Deserialize)]
    struct File {
        daemon: DaemonConfig,
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/daemon/m31r.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let file: File = toml::from_str(&text).unwrap();
    assert_eq!(file.daemon, DaemonConfig::default(), "{path} must show the defaults");
    let every_key = DaemonConfig {
        bundle: Some("b".into()),
        socket: Some("s".into()),
        log_file: Some("l".into()),
        ..DaemonConfig::default()
    };
    let keys = toml::Table::try_from(&every_key).unwrap();
    for key in keys.keys() {
        let set = format!("\n{key} = ");
        let unset = format!("\n# {key} = ");
        assert!(text.contains(&set) || text.contains(&unset), "{path} lacks `{key}`");
    }
}
