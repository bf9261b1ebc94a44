/*
 * fuse-iotests-blk: one image served at a regular-file mountpoint on
 * libfuse's low-level API, with the semantics of QEMU's FUSE export
 * (block/export/fuse.c) and of our reference exporter, so that the cases'
 * transcripts differ only where the transport or the kernel does.
 *
 * Every transport detail (/dev/fuse, clone fds, FUSE-over-io_uring rings,
 * INIT negotiation, teardown) is left to libfuse: the point is to test it.
 *
 *   fuse-iotests-blk --mountpoint MP --pidfile F (--image IMG | --null-size N)
 *       [--writable] [--growable] [--allow-other on|off|auto]
 *       [--queues N] [--io-uring on|off|auto] [--ring-depth N] [--max-write N]
 *
 * Start-up errors are one line on stderr and status 1.  The pidfile is
 * written from the INIT handler: the mount is then up and negotiated.
 */
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 18)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct export {
    int fd; /* -1: null-co, reads zeroes, writes are dropped */
    bool writable, growable, allow_other;
    const char *io_uring; /* on, off, auto */
    const char *pidfile;
    unsigned max_write;
    off_t size; /* under lock when it changes */
    mode_t mode;
    uid_t uid;
    gid_t gid;
    struct timespec start;
    pthread_mutex_t lock; /* size changes, mode, uid, gid */
    int failed; /* set by the INIT handler: stop, status 1 */
};

static struct export exp = { .fd = -1, .io_uring = "off", .max_write = 128 << 10 };
static struct fuse_session *session;

static off_t cur_size(void)
{
    return __atomic_load_n(&exp.size, __ATOMIC_ACQUIRE);
}

static void set_size(off_t size)
{
    __atomic_store_n(&exp.size, size, __ATOMIC_RELEASE);
}

static void fill_attr(struct stat *st)
{
    struct stat img;

    memset(st, 0, sizeof(*st));
    st->st_ino = FUSE_ROOT_ID;
    pthread_mutex_lock(&exp.lock); /* a SETATTR may run on another thread */
    st->st_mode = exp.mode;
    st->st_uid = exp.uid;
    st->st_gid = exp.gid;
    pthread_mutex_unlock(&exp.lock);
    st->st_nlink = 1;
    st->st_size = cur_size();
    st->st_blksize = 512;
    if (exp.fd >= 0 && fstat(exp.fd, &img) == 0) {
        st->st_blocks = img.st_blocks;
    }
    st->st_atim = st->st_mtim = st->st_ctim = exp.start;
}

static void reply_attr(fuse_req_t req)
{
    struct stat st;

    fill_attr(&st);
    fuse_reply_attr(req, &st, 1.0); /* one second, as QEMU */
}

/* Grow the image to at least end (a growable write, a zeroing fallocate). */
static int grow_to(off_t end)
{
    int ret = 0;

    pthread_mutex_lock(&exp.lock);
    if (end > exp.size) {
        if (exp.fd >= 0 && ftruncate(exp.fd, end) < 0) {
            ret = -errno;
        } else {
            set_size(end);
        }
    }
    pthread_mutex_unlock(&exp.lock);
    return ret;
}

static int write_zeroes(off_t off, off_t len)
{
    static const char zeroes[64 << 10];

    if (exp.fd < 0) {
        return 0;
    }
    if (fallocate(exp.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len) == 0) {
        return 0;
    }
    if (errno != EOPNOTSUPP && errno != ENOSYS) {
        return -errno;
    }
    while (len > 0) {
        ssize_t n = pwrite(exp.fd, zeroes, len < (off_t)sizeof(zeroes) ? (size_t)len : sizeof(zeroes), off);
        if (n < 0) {
            return -errno;
        }
        off += n;
        len -= n;
    }
    return 0;
}

static void blk_init(void *userdata, struct fuse_conn_info *conn)
{
    FILE *f;

    (void)userdata;
    conn->max_write = exp.max_write;
    if (!strcmp(exp.io_uring, "on") && !(conn->capable_ext & FUSE_CAP_OVER_IO_URING)) {
        fprintf(stderr, "System doesn't support FUSE-over-io_uring\n");
        exp.failed = 1;
        fuse_session_exit(session);
        return;
    }
    f = fopen(exp.pidfile, "w");
    if (f == NULL || fprintf(f, "%d\n", getpid()) < 0 || fclose(f) != 0) {
        fprintf(stderr, "Cannot write pidfile '%s': %s\n", exp.pidfile, strerror(errno));
        exp.failed = 1;
        fuse_session_exit(session);
    }
}

static void blk_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    (void)parent;
    (void)name;
    fuse_reply_err(req, ENOENT);
}

static void blk_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    reply_attr(req);
}

static void blk_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int valid,
                        struct fuse_file_info *fi)
{
    int to_set = valid & ~(FUSE_SET_ATTR_KILL_SUID | FUSE_SET_ATTR_KILL_SGID);
    int supported = FUSE_SET_ATTR_SIZE | FUSE_SET_ATTR_MODE;

    (void)ino;
    (void)fi;
    if (exp.allow_other) {
        supported |= FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID;
    }
    if (to_set & ~supported) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if (to_set & FUSE_SET_ATTR_MODE) {
        /* Without allow_other nobody else can open the file anyway. */
        if (!exp.allow_other && (attr->st_mode & (S_IRWXG | S_IRWXO))) {
            fuse_reply_err(req, EPERM);
            return;
        }
        if (!exp.writable && (attr->st_mode & (S_IWUSR | S_IWGRP | S_IWOTH))) {
            fuse_reply_err(req, EROFS);
            return;
        }
    }
    if (to_set & FUSE_SET_ATTR_SIZE) {
        if (!exp.writable) {
            fuse_reply_err(req, EACCES);
            return;
        }
        pthread_mutex_lock(&exp.lock);
        if (exp.fd >= 0 && ftruncate(exp.fd, attr->st_size) < 0) {
            int err = errno;
            pthread_mutex_unlock(&exp.lock);
            fuse_reply_err(req, err);
            return;
        }
        set_size(attr->st_size);
        pthread_mutex_unlock(&exp.lock);
    }
    pthread_mutex_lock(&exp.lock);
    if (to_set & FUSE_SET_ATTR_MODE) {
        exp.mode = S_IFREG | (attr->st_mode & 07777);
    }
    if (to_set & FUSE_SET_ATTR_UID) {
        exp.uid = attr->st_uid;
    }
    if (to_set & FUSE_SET_ATTR_GID) {
        exp.gid = attr->st_gid;
    }
    pthread_mutex_unlock(&exp.lock);
    reply_attr(req);
}

static void blk_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    /* Direct I/O: the page cache would hide what the block layer sees. */
    fi->direct_io = 1;
    fi->parallel_direct_writes = 1;
    fuse_reply_open(req, fi);
}

static void blk_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    off_t end = off + (off_t)size;
    char *buf;
    ssize_t n = 0;

    (void)ino;
    (void)fi;
    if (end > cur_size()) {
        end = cur_size();
    }
    if (end <= off) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    buf = calloc(1, end - off);
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    if (exp.fd >= 0) {
        n = pread(exp.fd, buf, end - off, off);
    } else {
        n = end - off;
    }
    if (n < 0) {
        fuse_reply_err(req, errno);
    } else {
        fuse_reply_buf(req, buf, n);
    }
    free(buf);
}

static void blk_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    off_t end = off + (off_t)size;
    ssize_t n;

    (void)ino;
    (void)fi;
    if (!exp.writable) {
        fuse_reply_err(req, EACCES);
        return;
    }
    if (end > cur_size()) {
        if (exp.growable) {
            int ret = grow_to(end);
            if (ret < 0) {
                fuse_reply_err(req, -ret);
                return;
            }
        } else {
            /* Short write at EOF; 0 at or past it (the client sees ENOSPC). */
            size = off < cur_size() ? (size_t)(cur_size() - off) : 0;
        }
    }
    n = size == 0 || exp.fd < 0 ? (ssize_t)size : pwrite(exp.fd, buf, size, off);
    if (n < 0) {
        fuse_reply_err(req, errno);
    } else {
        fuse_reply_write(req, n);
    }
}

static void blk_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, exp.fd >= 0 && fdatasync(exp.fd) < 0 ? errno : 0);
}

static void blk_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)datasync;
    blk_flush(req, ino, fi);
}

static void blk_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    fuse_reply_err(req, 0);
}

static void blk_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                          struct fuse_file_info *fi)
{
    int ret = 0;

    (void)ino;
    (void)fi;
    if (!exp.writable) {
        fuse_reply_err(req, EACCES);
        return;
    }
    if (mode == 0) {
        /* Only growing is an allocation: QEMU preallocates no image's inside. */
        if (off < cur_size()) {
            ret = -EOPNOTSUPP;
        } else if (exp.fd >= 0) {
            struct stat st;
            pthread_mutex_lock(&exp.lock);
            if (fallocate(exp.fd, 0, off, len) < 0 || fstat(exp.fd, &st) < 0) {
                ret = -errno;
            } else {
                set_size(st.st_size);
            }
            pthread_mutex_unlock(&exp.lock);
        }
    } else if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)) {
        off_t end = off + len < cur_size() ? off + len : cur_size();
        if (end > off && exp.fd >= 0 &&
            fallocate(exp.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, end - off) < 0) {
            /* A punched range must read back as zeroes. */
            ret = errno == EOPNOTSUPP || errno == ENOSYS ? write_zeroes(off, end - off) : -errno;
        }
    } else if ((mode & ~FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE) {
        off_t end = off + len;
        if (end > cur_size() && !(mode & FALLOC_FL_KEEP_SIZE)) {
            ret = grow_to(end);
        }
        if (end > cur_size()) {
            end = cur_size();
        }
        if (ret == 0 && end > off) {
            ret = write_zeroes(off, end - off);
        }
    } else {
        ret = -EOPNOTSUPP;
    }
    fuse_reply_err(req, -ret);
}

static void blk_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                      struct fuse_file_info *fi)
{
    off_t pos;

    (void)ino;
    (void)fi;
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (exp.fd < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    pos = lseek(exp.fd, off, whence);
    if (pos < 0) {
        fuse_reply_err(req, errno);
    } else {
        fuse_reply_lseek(req, pos);
    }
}

static const struct fuse_lowlevel_ops ops = {
    .init = blk_init,
    .lookup = blk_lookup,
    .getattr = blk_getattr,
    .setattr = blk_setattr,
    .open = blk_open,
    .read = blk_read,
    .write = blk_write,
    .flush = blk_flush,
    .fsync = blk_fsync,
    .release = blk_release,
    .fallocate = blk_fallocate,
    .lseek = blk_lseek,
    /* No statfs: libfuse's default answer is QEMU's (512-byte blocks). */
};

/* A start-up error: one line on stderr, status 1. */
static int __attribute__((format(printf, 1, 2))) fail(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return 1;
}

/*
 * Is there a FUSE mount on path?  Refused as the reference refuses it:
 * stacking would let the bottom export be unmounted under its clients.
 * (fuse.c refuses only a mountpoint in its own daemon's exports table.)
 */
static bool fuse_mounted(const char *path)
{
    char real[4096], line[8192];
    bool found = false;
    FILE *f;

    if (realpath(path, real) == NULL || (f = fopen("/proc/self/mountinfo", "r")) == NULL) {
        return false;
    }
    while (!found && fgets(line, sizeof(line), f)) {
        char mp[4096], fstype[256];
        const char *sep = strstr(line, " - ");
        /* id parent major:minor root mountpoint ... - fstype source opts */
        if (sep && sscanf(line, "%*s %*s %*s %*s %4095s", mp) == 1 &&
            sscanf(sep, " - %255s", fstype) == 1) {
            found = !strcmp(mp, real) && !strncmp(fstype, "fuse", 4);
        }
    }
    fclose(f);
    return found;
}

static bool is_choice(const char *v)
{
    return !strcmp(v, "on") || !strcmp(v, "off") || !strcmp(v, "auto");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "image", required_argument, NULL, 'i' },
        { "null-size", required_argument, NULL, 'n' },
        { "mountpoint", required_argument, NULL, 'm' },
        { "pidfile", required_argument, NULL, 'p' },
        { "writable", no_argument, NULL, 'w' },
        { "growable", no_argument, NULL, 'g' },
        { "allow-other", required_argument, NULL, 'a' },
        { "queues", required_argument, NULL, 'q' },
        { "io-uring", required_argument, NULL, 'u' },
        { "ring-depth", required_argument, NULL, 'd' },
        { "max-write", required_argument, NULL, 'W' },
        { 0 },
    };
    const char *image = NULL, *mountpoint = NULL, *allow_other = "auto";
    long long null_size = -1;
    unsigned queues = 1, ring_depth = 0;
    char depth_opt[64], fsname[4200];
    struct stat st;
    struct fuse_session *se;
    int c, ret;

    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'i': image = optarg; break;
        case 'n': null_size = strtoll(optarg, NULL, 0); break;
        case 'm': mountpoint = optarg; break;
        case 'p': exp.pidfile = optarg; break;
        case 'w': exp.writable = true; break;
        case 'g': exp.growable = true; break;
        case 'a': allow_other = optarg; break;
        case 'q': queues = strtoul(optarg, NULL, 0); break;
        case 'u': exp.io_uring = optarg; break;
        case 'd': ring_depth = strtoul(optarg, NULL, 0); break;
        case 'W': exp.max_write = strtoul(optarg, NULL, 0); break;
        default: return 1; /* getopt said why */
        }
    }
    if (optind < argc || !mountpoint || !exp.pidfile || !image == (null_size < 0)) {
        fprintf(stderr, "usage: %s --mountpoint MP --pidfile F (--image IMG | --null-size N) "
                        "[options]\n", argv[0]);
        return 1;
    }
    if (!is_choice(allow_other) || !is_choice(exp.io_uring) || queues < 1) {
        fprintf(stderr, "bad --allow-other, --io-uring or --queues\n");
        return 1;
    }
    if (exp.growable && !exp.writable) {
        fprintf(stderr, "--growable requires --writable\n");
        return 1;
    }
    /* The mount table first: stat() on a FUSE mount asks its server. */
    if (fuse_mounted(mountpoint)) {
        return fail("There already is a FUSE export on '%s'", mountpoint);
    }
    if (stat(mountpoint, &st) < 0) {
        return fail("Failed to stat '%s': %s", mountpoint, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        return fail("'%s' is not a regular file", mountpoint);
    }
    if (image) {
        struct stat img;
        exp.fd = open(image, (exp.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
        if (exp.fd < 0) {
            return fail("Could not open '%s': %s", image, strerror(errno));
        }
        if (fstat(exp.fd, &img) < 0) {
            return fail("Could not stat '%s': %s", image, strerror(errno));
        }
        exp.size = S_ISBLK(img.st_mode) ? lseek(exp.fd, 0, SEEK_END) : img.st_size;
    } else {
        exp.size = null_size;
    }
    /* As QEMU: the attributes live in the export; others get in after a chmod. */
    exp.mode = S_IFREG | S_IRUSR | (exp.writable ? S_IWUSR : 0);
    exp.uid = getuid();
    exp.gid = getgid();
    exp.allow_other = strcmp(allow_other, "off") != 0; /* root: auto always gets it */
    clock_gettime(CLOCK_REALTIME, &exp.start);
    pthread_mutex_init(&exp.lock, NULL);

    snprintf(fsname, sizeof(fsname), "fsname=%s", image ? image : "null-co");
    snprintf(depth_opt, sizeof(depth_opt), "io_uring_q_depth=%u", ring_depth);
    {
        /* libfuse takes one option per -o here (a comma in fsname would split). */
        char *args_v[32];
        int n = 0;
        args_v[n++] = argv[0];
        args_v[n++] = "-o"; args_v[n++] = "subtype=fuse-iotests-libfuse";
        args_v[n++] = "-o"; args_v[n++] = fsname;
        args_v[n++] = "-o"; args_v[n++] = "default_permissions";
        if (!exp.writable) {
            args_v[n++] = "-o"; args_v[n++] = "ro"; /* EROFS before any request, as QEMU */
        }
        if (exp.allow_other) {
            args_v[n++] = "-o"; args_v[n++] = "allow_other";
        }
        if (strcmp(exp.io_uring, "off")) {
            args_v[n++] = "-o"; args_v[n++] = "io_uring";
            if (ring_depth) {
                args_v[n++] = "-o"; args_v[n++] = depth_opt;
            }
        }
        struct fuse_args args = FUSE_ARGS_INIT(n, args_v);
        se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    }
    if (se == NULL) {
        fprintf(stderr, "Failed to create the FUSE session\n");
        return 1;
    }
    session = se;
    if (fuse_set_signal_handlers(se) != 0) {
        fprintf(stderr, "Failed to set up signal handlers\n");
        return 1;
    }
    if (fuse_session_mount(se, mountpoint) != 0) {
        return fail("Failed to mount '%s'", mountpoint);
    }
    if (queues > 1) {
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        fuse_loop_cfg_set_max_threads(cfg, queues);
        fuse_loop_cfg_set_idle_threads(cfg, queues);
        ret = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
    } else {
        ret = fuse_session_loop(se);
    }
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    if (exp.failed) {
        return 1;
    }
    /* A signal or an external umount ends the export cleanly, as QEMU. */
    return ret < 0 && ret != -ENODEV ? 1 : 0;
}
