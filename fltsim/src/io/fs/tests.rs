//! Tests of the model file system, each on its own volume in its own host directory.

use std::path::PathBuf;

use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_CREATE, FILE_DELETE_ON_CLOSE, FILE_DIRECTORY_FILE, FILE_NON_DIRECTORY_FILE, FILE_OPEN, FILE_OPEN_IF,
        FILE_OPEN_REPARSE_POINT, FILE_OVERWRITE, FILE_OVERWRITE_IF, FILE_SUPERSEDE,
    },
    Win32::{
        Foundation::{
            GENERIC_READ, NTSTATUS, STATUS_ACCESS_DENIED, STATUS_CANNOT_DELETE, STATUS_DELETE_PENDING,
            STATUS_DIRECTORY_NOT_EMPTY, STATUS_END_OF_FILE, STATUS_FILE_CLOSED, STATUS_FILE_IS_A_DIRECTORY,
            STATUS_INVALID_PARAMETER, STATUS_NOT_A_DIRECTORY, STATUS_OBJECT_NAME_COLLISION, STATUS_OBJECT_NAME_INVALID,
            STATUS_OBJECT_NAME_NOT_FOUND, STATUS_OBJECT_PATH_NOT_FOUND, STATUS_REPARSE, STATUS_SHARING_VIOLATION,
        },
        Storage::FileSystem::{
            DELETE, FILE_APPEND_DATA, FILE_ATTRIBUTE_ARCHIVE, FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_HIDDEN,
            FILE_ATTRIBUTE_NORMAL, FILE_ATTRIBUTE_READONLY, FILE_ATTRIBUTE_REPARSE_POINT, FILE_READ_ATTRIBUTES,
            FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_ATTRIBUTES,
            FILE_WRITE_DATA, SYNCHRONIZE,
        },
        System::WindowsProgramming::{
            FILE_CREATED, FILE_DOES_NOT_EXIST, FILE_EXISTS, FILE_OPENED, FILE_OVERWRITTEN, FILE_SUPERSEDED,
        },
    },
};

use super::*;
use crate::io::VolumeSpec;

const SHARE_ALL: u32 = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE;
const RW: u32 = FILE_READ_DATA | FILE_WRITE_DATA;
const MAXIMUM: u32 = 0x0200_0000;

/// A volume in its own host directory; its model state and directory go when it drops.
struct Fixture {
    volume: Volume,
    root: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("fltsim-fs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let volume = Volume {
            handle: 0,
            device_name: format!(r"\Device\FsTest{name}"),
            guid_name: format!(r"\??\Volume{{{name}}}"),
            spec: VolumeSpec::ntfs('T', &root),
        };
        Self { volume, root }
    }

    fn host(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn create(&self, path: &str, p: &CreateParams) -> Result<Created, NTSTATUS> {
        create(&self.volume, path, p)
    }

    fn ex(&self, path: &str, p: &CreateParams) -> Result<CreateOutcome, NTSTATUS> {
        create_ex(&self.volume, path, p)
    }

    /// Creates a file with `data` and closes it.
    fn file(&self, path: &str, data: &[u8]) -> u64 {
        let c = self.create(path, &params(FILE_CREATE, 0, RW)).unwrap();
        write(c.open, Some(0), data).unwrap();
        done(c.open);
        c.file_id
    }

    fn dir(&self, path: &str) -> u64 {
        let c = self.create(path, &params(FILE_CREATE, FILE_DIRECTORY_FILE, FILE_READ_DATA)).unwrap();
        done(c.open);
        c.file_id
    }

    fn open(&self, path: &str, access: u32) -> Result<Created, NTSTATUS> {
        self.create(path, &params(FILE_OPEN, 0, access))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        forget_volume(&self.volume);
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn params(disposition: u32, options: u32, access: u32) -> CreateParams {
    CreateParams { disposition, options, desired_access: access, share_access: SHARE_ALL, ..CreateParams::default() }
}

fn done(open: OpenId) {
    cleanup(open);
    close(open);
}

#[test]
fn names_compare_by_the_upcase_table_unless_case_sensitive() {
    let fx = Fixture::new("case");
    fx.file(r"\Straße.txt", b"x");
    fx.file(r"\ä.txt", b"y");
    assert!(fx.open(r"\STRAßE.TXT", FILE_READ_DATA).is_ok());
    assert_eq!(fx.open(r"\STRASSE.TXT", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
    let upper = fx.open(r"\Ä.TXT", FILE_READ_DATA).unwrap();
    assert_eq!(name(upper.open).unwrap(), r"\ä.txt");
    let sensitive = CreateParams { case_sensitive: true, ..params(FILE_OPEN, 0, FILE_READ_DATA) };
    assert_eq!(fx.create(r"\Ä.TXT", &sensitive).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
    let create_sensitive = CreateParams { case_sensitive: true, ..params(FILE_CREATE, 0, RW) };
    let second = fx.create(r"\Ä.txt", &create_sensitive).unwrap();
    assert_eq!(second.information, FILE_CREATED as usize);
    assert_ne!(second.file_id, upper.file_id);
    assert!(fx.host("Ä.txt").exists() && fx.host("ä.txt").exists());
}

#[test]
fn invalid_names_and_trailing_backslashes() {
    let fx = Fixture::new("invalid");
    for bad in [r"\a<b", r"\a|b", r"\a?b", r"\a*b", "\\a\u{7}b", r"\a\..\b", r"\f:s:$BAD"] {
        assert_eq!(fx.create(bad, &params(FILE_CREATE, 0, RW)).err(), Some(STATUS_OBJECT_NAME_INVALID), "{bad}");
    }
    assert_eq!(fx.create(r"\new\", &params(FILE_CREATE, 0, RW)).err(), Some(STATUS_OBJECT_NAME_INVALID));
    fx.file(r"\f.txt", b"");
    assert_eq!(fx.open(r"\f.txt\", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_INVALID));
    let d = fx.create(r"\d\", &params(FILE_CREATE, FILE_DIRECTORY_FILE, FILE_READ_DATA)).unwrap();
    assert!(d.directory);
    assert!(fx.open(r"\d\", FILE_READ_ATTRIBUTES).unwrap().directory);
}

#[test]
fn nt_level_names_keep_trailing_dots_and_spaces() {
    let fx = Fixture::new("dots");
    fx.file(r"\name. ", b"1");
    assert!(fx.host("name. ").exists());
    assert_eq!(fx.open(r"\name", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
    assert!(fx.open(r"\NAME. ", FILE_READ_DATA).is_ok());
}

#[test]
fn named_streams_share_identity_but_not_data() {
    let fx = Fixture::new("streams");
    let id = fx.file(r"\f.txt", b"default");
    let s = fx.create(r"\f.txt:meta", &params(FILE_CREATE, 0, RW)).unwrap();
    assert_eq!(s.information, FILE_CREATED as usize);
    assert_eq!(s.file_id, id);
    write(s.open, None, b"side").unwrap();
    let base = fx.open(r"\f.txt", FILE_READ_DATA).unwrap();
    assert_ne!(base.stream, s.stream);
    assert_eq!(fx.open(r"\f.txt::$DATA", FILE_READ_DATA).unwrap().stream, base.stream);
    let again = fx.open(r"\F.TXT:META:$DATA", FILE_READ_DATA).unwrap();
    assert_eq!(again.stream, s.stream);
    assert_eq!(read(again.open, 0, 100).unwrap(), b"side");
    assert_eq!(name(again.open).unwrap(), r"\f.txt:meta");
    assert_eq!(fs::read(fx.host("f.txt")).unwrap(), b"default");
    assert_eq!(fx.create(r"\f.txt:meta", &params(FILE_CREATE, 0, RW)).err(), Some(STATUS_OBJECT_NAME_COLLISION));
    assert_eq!(fx.open(r"\f.txt:nope", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
    // Creating a stream of a missing file creates the file.
    let fresh = fx.create(r"\new.txt:s", &params(FILE_OPEN_IF, 0, RW)).unwrap();
    assert_eq!(fresh.information, FILE_CREATED as usize);
    assert_eq!(fs::metadata(fx.host("new.txt")).unwrap().len(), 0);
    // Overwriting a stream truncates that stream only.
    let o = fx.create(r"\f.txt:meta", &params(FILE_OVERWRITE, 0, RW)).unwrap();
    assert_eq!(o.information, FILE_OVERWRITTEN as usize);
    assert_eq!(end_of_file(o.open).unwrap(), 0);
    assert_eq!(end_of_file(base.open).unwrap(), 7);
}

#[test]
fn short_names_are_generated_per_directory_and_resolve() {
    let fx = Fixture::new("short");
    fs::write(fx.host("Zeta Long Name.txt"), b"pre").unwrap();
    fx.file(r"\LongFileName.txt", b"a");
    fx.file(r"\LongFileNameTwo.txt", b"b");
    fx.file(r"\readme.txt", b"c");
    let first = fx.open(r"\LONGFI~1.TXT", FILE_READ_DATA).unwrap();
    assert_eq!(normalized_name(first.open).unwrap(), r"\LongFileName.txt");
    assert_eq!(short_name(first.open).unwrap().as_deref(), Some("LONGFI~1.TXT"));
    let second = fx.open(r"\LongFileNameTwo.txt", FILE_READ_DATA).unwrap();
    assert_eq!(short_name(second.open).unwrap().as_deref(), Some("LONGFI~2.TXT"));
    assert_eq!(short_name(fx.open(r"\readme.txt", FILE_READ_DATA).unwrap().open).unwrap(), None);
    let adopted = fx.open(r"\ZETALO~1.TXT", FILE_READ_DATA).unwrap();
    assert_eq!(read(adopted.open, 0, 10).unwrap(), b"pre");
    fx.dir(r"\Program Files");
    fx.file(r"\Program Files\Some Application.exe", b"x");
    let deep = fx.open(r"\PROGRA~1\SOMEAP~1.EXE", FILE_READ_DATA).unwrap();
    assert_eq!(normalized_name(deep.open).unwrap(), r"\Program Files\Some Application.exe");
    // A short name can also be created against: FILE_CREATE on it collides.
    assert_eq!(fx.create(r"\longfi~1.txt", &params(FILE_CREATE, 0, RW)).err(), Some(STATUS_OBJECT_NAME_COLLISION));
}

#[test]
fn file_ids_hard_links_and_open_by_id() {
    let fx = Fixture::new("links");
    let id = fx.file(r"\a.txt", b"shared");
    fx.dir(r"\d");
    let a = fx.create(r"\a.txt", &params(FILE_OPEN, 0, RW | DELETE)).unwrap();
    assert_eq!(file_id(a.open).unwrap(), id);
    link(a.open, r"\d\b.txt", false).unwrap();
    assert_eq!(query_standard(a.open).unwrap().number_of_links, 2);
    fs::write(fx.host("d/b.txt"), b"SHARED").unwrap();
    assert_eq!(read(a.open, 0, 6).unwrap(), b"SHARED");
    let b = fx.open(r"\d\b.txt", FILE_READ_DATA).unwrap();
    assert_eq!(b.file_id, id);
    assert_eq!(b.stream, a.stream);
    assert_eq!(link(a.open, r"\d\b.txt", false), Err(STATUS_OBJECT_NAME_COLLISION));
    done(b.open);
    fx.file(r"\c.txt", b"other");
    link(a.open, r"\c.txt", true).unwrap();
    assert_eq!(fs::read(fx.host("c.txt")).unwrap(), b"SHARED");
    let dir = fx.open(r"\d", FILE_READ_ATTRIBUTES).unwrap();
    assert_eq!(link(dir.open, r"\e", false), Err(STATUS_FILE_IS_A_DIRECTORY));
    // Open by ID, renamed or not.
    rename(a.open, r"\d\moved.txt", false).unwrap();
    assert_eq!(file_id(a.open).unwrap(), id);
    let by_id = create_by_file_id(&fx.volume, id, &params(FILE_OPEN, 0, FILE_READ_DATA)).unwrap();
    assert_eq!(by_id.file_id, id);
    assert_eq!(read(by_id.open, 0, 6).unwrap(), b"SHARED");
    assert_eq!(
        create_by_file_id(&fx.volume, 0x1234, &params(FILE_OPEN, 0, FILE_READ_DATA)).err(),
        Some(STATUS_INVALID_PARAMETER)
    );
    assert_eq!(fx.open(r"\", FILE_READ_ATTRIBUTES).unwrap().file_id, ROOT_FILE_ID);
}

#[test]
fn renames_collide_replace_and_keep_identity() {
    let fx = Fixture::new("rename");
    let id = fx.file(r"\a.txt", b"a");
    fx.file(r"\b.txt", b"b");
    let no_delete = fx.open(r"\a.txt", FILE_READ_DATA).unwrap();
    assert_eq!(rename(no_delete.open, r"\x.txt", false), Err(STATUS_ACCESS_DENIED));
    done(no_delete.open);
    let a = fx.create(r"\a.txt", &params(FILE_OPEN, 0, DELETE | FILE_READ_DATA)).unwrap();
    assert_eq!(rename(a.open, r"\b.txt", false), Err(STATUS_OBJECT_NAME_COLLISION));
    let held = fx.open(r"\b.txt", FILE_READ_DATA).unwrap();
    assert_eq!(rename(a.open, r"\b.txt", true), Err(STATUS_ACCESS_DENIED));
    done(held.open);
    rename(a.open, r"\b.txt", true).unwrap();
    assert_eq!(fs::read(fx.host("b.txt")).unwrap(), b"a");
    assert!(!fx.host("a.txt").exists());
    assert_eq!(name(a.open).unwrap(), r"\b.txt");
    assert_eq!(file_id(a.open).unwrap(), id);
    rename(a.open, r"\B.TXT", false).unwrap();
    assert!(fx.host("B.TXT").exists());
    rename(a.open, r"\A Much Longer Name.txt", false).unwrap();
    assert_eq!(short_name(a.open).unwrap().as_deref(), Some("AMUCHL~1.TXT"));
    fx.dir(r"\target");
    assert_eq!(rename(a.open, r"\target", true), Err(STATUS_ACCESS_DENIED));
    assert_eq!(rename(a.open, r"\missing\x.txt", false), Err(STATUS_OBJECT_PATH_NOT_FOUND));
    fx.dir(r"\tree");
    fx.dir(r"\tree\sub");
    fx.file(r"\tree\sub\leaf.txt", b"");
    let tree = fx.create(r"\tree", &params(FILE_OPEN, FILE_DIRECTORY_FILE, DELETE)).unwrap();
    assert_eq!(rename(tree.open, r"\tree\sub\inside", false), Err(STATUS_INVALID_PARAMETER));
    let leaf = fx.open(r"\tree\sub\leaf.txt", FILE_READ_DATA).unwrap();
    assert_eq!(rename(tree.open, r"\forest", false), Err(STATUS_ACCESS_DENIED));
    done(leaf.open);
    rename(tree.open, r"\forest", false).unwrap();
    assert!(fx.host("forest/sub/leaf.txt").exists());
    assert!(fx.open(r"\forest\sub\leaf.txt", FILE_READ_DATA).is_ok());
}

#[test]
fn delete_dispositions_take_effect_at_the_last_cleanup() {
    let fx = Fixture::new("delete");
    fx.file(r"\f.txt", b"x");
    let reader = fx.open(r"\f.txt", FILE_READ_DATA).unwrap();
    assert_eq!(set_delete_disposition(reader.open, true), Err(STATUS_ACCESS_DENIED));
    let deleter = fx.create(r"\f.txt", &params(FILE_OPEN, 0, DELETE)).unwrap();
    set_delete_disposition(deleter.open, true).unwrap();
    assert!(query_standard(reader.open).unwrap().delete_pending);
    assert_eq!(fx.open(r"\f.txt", FILE_READ_DATA).err(), Some(STATUS_DELETE_PENDING));
    done(deleter.open);
    assert!(fx.host("f.txt").exists(), "another handle is still open");
    done(reader.open);
    assert!(!fx.host("f.txt").exists());
    assert_eq!(fx.open(r"\f.txt", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));

    // Undeleting, read-only files, non-empty directories.
    fx.file(r"\keep.txt", b"k");
    let k = fx.create(r"\keep.txt", &params(FILE_OPEN, 0, DELETE | FILE_WRITE_ATTRIBUTES)).unwrap();
    set_delete_disposition(k.open, true).unwrap();
    set_delete_disposition(k.open, false).unwrap();
    set_basic(k.open, &BasicInformation { file_attributes: FILE_ATTRIBUTE_READONLY, ..Default::default() }).unwrap();
    assert_eq!(set_delete_disposition(k.open, true), Err(STATUS_CANNOT_DELETE));
    done(k.open);
    assert!(fx.host("keep.txt").exists());
    fx.dir(r"\full");
    fx.file(r"\full\x", b"");
    let full = fx.create(r"\full", &params(FILE_OPEN, FILE_DIRECTORY_FILE, DELETE)).unwrap();
    assert_eq!(set_delete_disposition(full.open, true), Err(STATUS_DIRECTORY_NOT_EMPTY));
    assert_eq!(
        fx.create(r"\full", &params(FILE_OPEN, FILE_DIRECTORY_FILE | FILE_DELETE_ON_CLOSE, DELETE)).err(),
        Some(STATUS_DIRECTORY_NOT_EMPTY)
    );

    // FILE_DELETE_ON_CLOSE needs DELETE and deletes at cleanup; one link of two goes.
    assert_eq!(
        fx.create(r"\t.txt", &params(FILE_CREATE, FILE_DELETE_ON_CLOSE, RW)).err(),
        Some(STATUS_INVALID_PARAMETER)
    );
    let t = fx.create(r"\t.txt", &params(FILE_CREATE, FILE_DELETE_ON_CLOSE, RW | DELETE)).unwrap();
    link(t.open, r"\t2.txt", false).unwrap();
    done(t.open);
    assert!(!fx.host("t.txt").exists());
    let survivor = fx.open(r"\t2.txt", FILE_READ_DATA).unwrap();
    assert_eq!(survivor.file_id, t.file_id);
    assert_eq!(query_standard(survivor.open).unwrap().number_of_links, 1);

    // A named stream's disposition deletes the stream only.
    fx.file(r"\s.txt", b"base");
    let st = fx.create(r"\s.txt:alt", &params(FILE_CREATE, 0, RW | DELETE)).unwrap();
    set_delete_disposition(st.open, true).unwrap();
    done(st.open);
    assert_eq!(fx.open(r"\s.txt:alt", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
    assert!(fx.host("s.txt").exists());
}

#[test]
fn basic_information_attributes_and_read_only_files() {
    let fx = Fixture::new("basic");
    let c = fx.create(r"\f.txt", &params(FILE_CREATE, 0, RW | FILE_WRITE_ATTRIBUTES)).unwrap();
    let basic = query_basic(c.open).unwrap();
    assert_eq!(basic.file_attributes, FILE_ATTRIBUTE_ARCHIVE);
    assert!(basic.creation_time > 0);
    let mut changed = BasicInformation { last_write_time: 42, file_attributes: FILE_ATTRIBUTE_READONLY, ..basic };
    changed.creation_time = 0;
    set_basic(c.open, &changed).unwrap();
    let after = query_basic(c.open).unwrap();
    assert_eq!((after.last_write_time, after.creation_time), (42, basic.creation_time));
    assert_eq!(after.file_attributes, FILE_ATTRIBUTE_READONLY);
    assert_eq!(
        set_basic(c.open, &BasicInformation { file_attributes: FILE_ATTRIBUTE_DIRECTORY, ..Default::default() }),
        Err(STATUS_INVALID_PARAMETER)
    );
    done(c.open);
    assert_eq!(fx.open(r"\f.txt", FILE_WRITE_DATA).err(), Some(STATUS_ACCESS_DENIED));
    assert_eq!(fx.open(r"\f.txt", FILE_APPEND_DATA).err(), Some(STATUS_ACCESS_DENIED));
    assert_eq!(fx.create(r"\f.txt", &params(FILE_OVERWRITE_IF, 0, FILE_READ_DATA)).err(), Some(STATUS_ACCESS_DENIED));
    assert_eq!(
        fx.create(r"\f.txt", &params(FILE_OPEN, FILE_DELETE_ON_CLOSE, DELETE)).err(),
        Some(STATUS_CANNOT_DELETE)
    );
    let max = fx.open(r"\f.txt", MAXIMUM).unwrap();
    assert_eq!(write(max.open, None, b"no"), Err(STATUS_ACCESS_DENIED));
    assert!(read(max.open, 0, 1).is_err_and(|s| s == STATUS_END_OF_FILE));
    let attrs_only = fx.open(r"\f.txt", FILE_READ_ATTRIBUTES).unwrap();
    assert_eq!(set_basic(attrs_only.open, &BasicInformation::default()), Err(STATUS_ACCESS_DENIED));
    let w = fx.open(r"\f.txt", FILE_WRITE_ATTRIBUTES).unwrap();
    set_basic(w.open, &BasicInformation { file_attributes: FILE_ATTRIBUTE_NORMAL, ..Default::default() }).unwrap();
    assert_eq!(query_basic(w.open).unwrap().file_attributes, FILE_ATTRIBUTE_NORMAL);
    fx.dir(r"\d");
    assert_eq!(query_basic(fx.open(r"\d", 0).unwrap().open).unwrap().file_attributes, FILE_ATTRIBUTE_DIRECTORY);
}

#[test]
fn reparse_points_reparse_unless_opened_as_such() {
    let fx = Fixture::new("reparse");
    fx.file(r"\target.txt", b"t");
    fx.file(r"\link.txt", b"");
    fx.dir(r"\real");
    fx.dir(r"\real\sub");
    fx.dir(r"\j");
    fx.dir(r"\d");
    fx.file(r"\d\rel", b"");
    fx.dir(r"\mnt");
    set_reparse_point(&fx.volume, r"\link.txt", ReparseTarget::SymbolicLink(r"\target.txt".into())).unwrap();
    set_reparse_point(&fx.volume, r"\j", ReparseTarget::Junction(r"\real".into())).unwrap();
    set_reparse_point(&fx.volume, r"\d\rel", ReparseTarget::SymbolicLink(r"..\real\sub".into())).unwrap();
    set_reparse_point(&fx.volume, r"\mnt", ReparseTarget::MountPoint(r"\Device\HarddiskVolume9".into())).unwrap();
    let device = fx.volume.device_name.clone();
    let reparse = |tag, volume_name: &str, path: &str| {
        Ok(CreateOutcome::Reparse(Reparse { tag, volume_name: volume_name.to_owned(), path: path.to_owned() }))
    };
    let open = params(FILE_OPEN, 0, FILE_READ_DATA);
    assert_eq!(fx.ex(r"\link.txt", &open), reparse(IO_REPARSE_TAG_SYMLINK, &device, r"\target.txt"));
    assert_eq!(fx.ex(r"\LINK.TXT:s", &open), reparse(IO_REPARSE_TAG_SYMLINK, &device, r"\target.txt:s"));
    assert_eq!(fx.create(r"\link.txt", &open).err(), Some(STATUS_REPARSE));
    let as_link = params(FILE_OPEN, FILE_OPEN_REPARSE_POINT, FILE_READ_ATTRIBUTES);
    let itself = fx.create(r"\link.txt", &as_link).unwrap();
    assert_eq!(
        query_basic(itself.open).unwrap().file_attributes,
        FILE_ATTRIBUTE_ARCHIVE | FILE_ATTRIBUTE_REPARSE_POINT
    );
    // FILE_OPEN_REPARSE_POINT applies to the last component only.
    assert_eq!(fx.ex(r"\j\sub\x.txt", &as_link), reparse(IO_REPARSE_TAG_MOUNT_POINT, &device, r"\real\sub\x.txt"));
    assert_eq!(fx.ex(r"\d\rel\y", &open), reparse(IO_REPARSE_TAG_SYMLINK, &device, r"\real\sub\y"));
    assert_eq!(
        fx.ex(r"\mnt\a\b.txt", &open),
        reparse(IO_REPARSE_TAG_MOUNT_POINT, r"\Device\HarddiskVolume9", r"\a\b.txt")
    );
    assert_eq!(fx.ex(r"\mnt", &open), reparse(IO_REPARSE_TAG_MOUNT_POINT, r"\Device\HarddiskVolume9", r"\"));
    fx.dir(r"\busy");
    fx.file(r"\busy\x", b"");
    assert_eq!(
        set_reparse_point(&fx.volume, r"\busy", ReparseTarget::Junction(r"\real".into())),
        Err(STATUS_DIRECTORY_NOT_EMPTY)
    );
    assert_eq!(
        set_reparse_point(&fx.volume, r"\target.txt", ReparseTarget::MountPoint(device.clone())),
        Err(STATUS_NOT_A_DIRECTORY)
    );
    delete_reparse_point(&fx.volume, r"\link.txt").unwrap();
    assert!(matches!(fx.ex(r"\link.txt", &open), Ok(CreateOutcome::Opened(_))));
}

#[test]
fn acls_check_the_identity_asked_for() {
    let fx = Fixture::new("acl");
    fx.file(r"\f.txt", b"secret");
    fx.dir(r"\locked");
    set_acl(&fx.volume, r"\f.txt", Acl { read: vec!["alice".into()], write: vec![ADMINISTRATORS.into()] }).unwrap();
    set_acl(&fx.volume, r"\locked", Acl { read: vec![SYSTEM.into()], write: vec![SYSTEM.into()] }).unwrap();
    let as_who =
        |who: AccessIdentity, access: u32| CreateParams { check_access_for: Some(who), ..params(FILE_OPEN, 0, access) };
    let alice = AccessIdentity::user("Alice");
    let bob = AccessIdentity::user("bob");
    let admin = AccessIdentity { user: "root".into(), admin: true };
    assert!(fx.create(r"\f.txt", &as_who(alice.clone(), GENERIC_READ)).is_ok());
    assert_eq!(fx.create(r"\f.txt", &as_who(alice.clone(), FILE_WRITE_DATA)).err(), Some(STATUS_ACCESS_DENIED));
    assert_eq!(fx.create(r"\f.txt", &as_who(bob.clone(), FILE_READ_DATA)).err(), Some(STATUS_ACCESS_DENIED));
    assert!(fx.create(r"\f.txt", &as_who(bob.clone(), FILE_READ_ATTRIBUTES | SYNCHRONIZE)).is_ok());
    assert!(fx.create(r"\f.txt", &as_who(admin.clone(), FILE_WRITE_DATA)).is_ok());
    assert!(fx.open(r"\f.txt", RW).is_ok(), "kernel-mode opens skip the check");
    let max = fx.create(r"\f.txt", &as_who(alice.clone(), MAXIMUM)).unwrap();
    assert!(read(max.open, 0, 6).is_ok());
    assert_eq!(write(max.open, None, b"x"), Err(STATUS_ACCESS_DENIED));
    let overwrite = CreateParams { check_access_for: Some(alice), ..params(FILE_OVERWRITE, 0, FILE_READ_DATA) };
    assert_eq!(fx.create(r"\f.txt", &overwrite).err(), Some(STATUS_ACCESS_DENIED));
    let create_in = |who: AccessIdentity| CreateParams { check_access_for: Some(who), ..params(FILE_CREATE, 0, RW) };
    assert_eq!(fx.create(r"\locked\n.txt", &create_in(admin)).err(), Some(STATUS_ACCESS_DENIED));
    assert!(fx.create(r"\locked\n.txt", &create_in(AccessIdentity::system())).is_ok());
    // The new file inherited the directory's ACL.
    assert_eq!(fx.create(r"\locked\n.txt", &as_who(bob, FILE_READ_DATA)).err(), Some(STATUS_ACCESS_DENIED));
}

#[test]
fn target_directory_opens_report_whether_the_name_exists() {
    let fx = Fixture::new("target");
    fx.dir(r"\d");
    fx.file(r"\d\there.txt", b"");
    let p = params(FILE_OPEN, 0, FILE_WRITE_DATA | SYNCHRONIZE);
    let (missing, info) = create_target_directory(&fx.volume, r"\d\new.txt", &p).unwrap();
    assert_eq!(info, FILE_DOES_NOT_EXIST);
    assert_eq!(missing.information, FILE_DOES_NOT_EXIST as usize);
    assert!(missing.directory);
    assert_eq!(name(missing.open).unwrap(), r"\d");
    let (_, info) = create_target_directory(&fx.volume, r"\D\THERE.TXT", &p).unwrap();
    assert_eq!(info, FILE_EXISTS);
    let (root, _) = create_target_directory(&fx.volume, r"\top.txt", &p).unwrap();
    assert_eq!(root.file_id, ROOT_FILE_ID);
    assert_eq!(create_target_directory(&fx.volume, r"\nope\x", &p).err(), Some(STATUS_OBJECT_PATH_NOT_FOUND));
    assert_eq!(create_target_directory(&fx.volume, r"\", &p).err(), Some(STATUS_OBJECT_NAME_INVALID));
}

#[test]
fn directories_and_their_options() {
    let fx = Fixture::new("dirs");
    fx.dir(r"\d");
    fx.file(r"\f", b"x");
    let dir_open = |options| params(FILE_OPEN, options, FILE_READ_ATTRIBUTES);
    assert_eq!(fx.create(r"\f", &dir_open(FILE_DIRECTORY_FILE)).err(), Some(STATUS_NOT_A_DIRECTORY));
    assert_eq!(fx.create(r"\d", &dir_open(FILE_NON_DIRECTORY_FILE)).err(), Some(STATUS_FILE_IS_A_DIRECTORY));
    assert_eq!(fx.create(r"\d", &params(FILE_OVERWRITE_IF, 0, RW)).err(), Some(STATUS_FILE_IS_A_DIRECTORY));
    assert_eq!(fx.create(r"\d::$DATA", &dir_open(0)).err(), Some(STATUS_FILE_IS_A_DIRECTORY));
    assert_eq!(
        fx.create(r"\e", &params(FILE_OVERWRITE_IF, FILE_DIRECTORY_FILE, RW)).err(),
        Some(STATUS_INVALID_PARAMETER)
    );
    assert_eq!(fx.create(r"\f\x", &dir_open(0)).err(), Some(STATUS_OBJECT_PATH_NOT_FOUND));
    assert_eq!(
        fx.create(r"\d", &params(FILE_CREATE, FILE_DIRECTORY_FILE, 0)).err(),
        Some(STATUS_OBJECT_NAME_COLLISION)
    );
    let d = fx.create(r"\d", &params(FILE_OPEN_IF, FILE_DIRECTORY_FILE, FILE_READ_DATA)).unwrap();
    assert_eq!(d.information, FILE_OPENED as usize);
    assert_eq!(read(d.open, 0, 1), Err(STATUS_INVALID_PARAMETER));
    assert!(query_standard(d.open).unwrap().directory);
    let made = fx.create(r"\d\e", &params(FILE_OPEN_IF, FILE_DIRECTORY_FILE, 0)).unwrap();
    assert_eq!(made.information, FILE_CREATED as usize);
    assert!(fx.host("d/e").is_dir());
}

#[test]
fn dispositions_report_what_they_did() {
    let fx = Fixture::new("dispositions");
    let info = |path: &str, disposition| fx.create(path, &params(disposition, 0, RW)).map(|c| c.information);
    assert_eq!(info(r"\a", FILE_OPEN), Err(STATUS_OBJECT_NAME_NOT_FOUND));
    assert_eq!(info(r"\a", FILE_OVERWRITE), Err(STATUS_OBJECT_NAME_NOT_FOUND));
    assert_eq!(info(r"\a", FILE_CREATE), Ok(FILE_CREATED as usize));
    assert_eq!(info(r"\a", FILE_CREATE), Err(STATUS_OBJECT_NAME_COLLISION));
    assert_eq!(info(r"\a", FILE_OPEN_IF), Ok(FILE_OPENED as usize));
    assert_eq!(info(r"\b", FILE_OPEN_IF), Ok(FILE_CREATED as usize));
    assert_eq!(info(r"\c", FILE_OVERWRITE_IF), Ok(FILE_CREATED as usize));
    assert_eq!(info(r"\d", FILE_SUPERSEDE), Ok(FILE_CREATED as usize));
    fs::write(fx.host("a"), b"data").unwrap();
    assert_eq!(info(r"\a", FILE_OVERWRITE), Ok(FILE_OVERWRITTEN as usize));
    assert_eq!(fs::metadata(fx.host("a")).unwrap().len(), 0);
    fs::write(fx.host("a"), b"data").unwrap();
    assert_eq!(info(r"\a", FILE_SUPERSEDE), Ok(FILE_SUPERSEDED as usize));
    assert_eq!(fs::metadata(fx.host("a")).unwrap().len(), 0);
    assert_eq!(info(r"\a", 9), Err(STATUS_INVALID_PARAMETER));
    // Overwriting a hidden file needs FILE_ATTRIBUTE_HIDDEN in the request.
    let h = fx.create(r"\h", &CreateParams { file_attributes: FILE_ATTRIBUTE_HIDDEN, ..params(FILE_CREATE, 0, RW) });
    assert_eq!(query_basic(h.unwrap().open).unwrap().file_attributes, FILE_ATTRIBUTE_HIDDEN | FILE_ATTRIBUTE_ARCHIVE);
    assert_eq!(info(r"\h", FILE_OVERWRITE_IF), Err(STATUS_ACCESS_DENIED));
    let keep = CreateParams { file_attributes: FILE_ATTRIBUTE_HIDDEN, ..params(FILE_OVERWRITE_IF, 0, RW) };
    assert_eq!(fx.create(r"\h", &keep).map(|c| c.information), Ok(FILE_OVERWRITTEN as usize));
}

#[test]
fn share_access_is_per_stream_and_ignores_attribute_opens() {
    let fx = Fixture::new("share");
    fx.file(r"\f", b"x");
    let with = |access, share| CreateParams { share_access: share, ..params(FILE_OPEN, 0, access) };
    let reader = fx.create(r"\f", &with(FILE_READ_DATA, FILE_SHARE_READ)).unwrap();
    assert!(fx.create(r"\f", &with(FILE_READ_DATA, SHARE_ALL)).is_ok());
    assert_eq!(fx.create(r"\f", &with(FILE_WRITE_DATA, SHARE_ALL)).err(), Some(STATUS_SHARING_VIOLATION));
    assert_eq!(fx.create(r"\f", &with(DELETE, SHARE_ALL)).err(), Some(STATUS_SHARING_VIOLATION));
    assert_eq!(fx.create(r"\f", &with(FILE_READ_DATA, FILE_SHARE_WRITE)).err(), Some(STATUS_SHARING_VIOLATION));
    // Opens without data or delete access take no part, on either side.
    let attrs = fx.create(r"\f", &with(FILE_READ_ATTRIBUTES | SYNCHRONIZE, 0)).unwrap();
    assert!(fx.create(r"\f", &with(FILE_WRITE_ATTRIBUTES, 0)).is_ok());
    // A named stream is arbitrated on its own.
    assert!(fx.create(r"\f:alt", &CreateParams { share_access: 0, ..params(FILE_OPEN_IF, 0, RW) }).is_ok());
    cleanup(reader.open);
    assert_eq!(read(reader.open, 0, 1), Err(STATUS_FILE_CLOSED));
    assert!(fx.create(r"\f", &with(FILE_WRITE_DATA, FILE_SHARE_READ)).is_ok());
    done(attrs.open);
}

#[test]
fn reads_writes_and_sizes() {
    let fx = Fixture::new("data");
    let c = fx.create(r"\f", &params(FILE_CREATE, 0, RW)).unwrap();
    assert_eq!(write(c.open, Some(0), b"hello").unwrap(), 5);
    assert_eq!(write(c.open, None, b" world").unwrap(), 6);
    assert_eq!(read(c.open, 6, 100).unwrap(), b"world");
    assert_eq!(read(c.open, 11, 1), Err(STATUS_END_OF_FILE));
    set_end_of_file(c.open, 5000).unwrap();
    let standard = query_standard(c.open).unwrap();
    assert_eq!((standard.end_of_file, standard.allocation_size), (5000, 8192));
    assert_eq!(fs::metadata(fx.host("f")).unwrap().len(), 5000);
    let s = fx.create(r"\f:s", &params(FILE_CREATE, 0, RW)).unwrap();
    write(s.open, Some(3), b"abc").unwrap();
    assert_eq!(read(s.open, 0, 10).unwrap(), b"\0\0\0abc");
    set_end_of_file(s.open, 1).unwrap();
    assert_eq!(query_standard(s.open).unwrap().allocation_size, CLUSTER_SIZE);
    let ro = fx.open(r"\f", FILE_READ_DATA).unwrap();
    assert_eq!(write(ro.open, None, b"x"), Err(STATUS_ACCESS_DENIED));
    assert_eq!(set_end_of_file(ro.open, 0), Err(STATUS_ACCESS_DENIED));
}

#[test]
fn host_changes_are_adopted_and_forgotten() {
    let fx = Fixture::new("host");
    fs::create_dir(fx.host("made")).unwrap();
    fs::write(fx.host("made/by host.txt"), b"h").unwrap();
    let c = fx.open(r"\made\BY HOST.TXT", FILE_READ_DATA).unwrap();
    assert_eq!(read(c.open, 0, 1).unwrap(), b"h");
    done(c.open);
    fs::remove_file(fx.host("made/by host.txt")).unwrap();
    assert_eq!(fx.open(r"\made\by host.txt", FILE_READ_DATA).err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
}
