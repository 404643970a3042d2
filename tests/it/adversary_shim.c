/* narq's test shim (LD_PRELOAD), built by tests/it/adversary.rs.
 *
 * Stop: with NARQ_SHIM_STOP_CALLS (comma-separated: rename, renameat, renameat2, unlink,
 * unlinkat) and NARQ_SHIM_STOP_MATCH, the NARQ_SHIM_STOP_NTH-th (default 1) such call whose
 * path argument (either one, for a rename) contains the match stops the whole process with
 * SIGSTOP (sent to the calling thread), before the call (NARQ_SHIM_STOP_WHEN=before, the default) or after it (=after).
 * First it creates NARQ_SHIM_STOP_MARKER exclusively and writes "PID CALL PATH" into it;
 * only the process that created the marker stops, so a shim inherited by children stops
 * one process once. With NARQ_SHIM_STOP_ARM, calls count only while that file exists (the
 * test arms the stop at a moment of its choosing).
 *
 * Delay: with NARQ_SHIM_DELAY_CALLS and NARQ_SHIM_DELAY_MATCH, every such call whose path
 * contains the match sleeps NARQ_SHIM_DELAY_MS first (that thread only: the rest of the
 * process goes on, as during a slow write).
 *
 * Clock: CLOCK_REALTIME (clock_gettime with CLOCK_REALTIME or CLOCK_REALTIME_COARSE,
 * gettimeofday, time) is shifted by NARQ_SHIM_CLOCK_OFFSET seconds, or by the number in the
 * file NARQ_SHIM_CLOCK_FILE, read at each call (the test rewrites it in place to move the
 * clock). CLOCK_MONOTONIC and the others are left alone. */
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wnonnull-compare"
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long stop_count;

/* Whether `call` is in the comma-separated list in the environment variable `var`. */
static int listed(const char *var, const char *call) {
    const char *calls = getenv(var);
    if (!calls) return 0;
    size_t n = strlen(call);
    for (const char *p = calls; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, call, n) == 0) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

/* Whether path `a` or `b` contains the match in the environment variable `var`. */
static int matches(const char *var, const char *a, const char *b) {
    const char *m = getenv(var);
    return m && ((a && strstr(a, m)) || (b && strstr(b, m)));
}

/* Sleeps first if this call is one to delay; says whether it is the one to stop at (counts
 * matching calls). */
static int chosen(const char *call, const char *a, const char *b) {
    if (listed("NARQ_SHIM_DELAY_CALLS", call) && matches("NARQ_SHIM_DELAY_MATCH", a, b)) {
        const char *ms = getenv("NARQ_SHIM_DELAY_MS");
        long n = ms ? atol(ms) : 0;
        struct timespec d = { n / 1000, (n % 1000) * 1000000L };
        int saved = errno;
        while (nanosleep(&d, &d) != 0 && errno == EINTR) {}
        errno = saved;
    }
    if (!listed("NARQ_SHIM_STOP_CALLS", call) || !matches("NARQ_SHIM_STOP_MATCH", a, b)) return 0;
    const char *arm = getenv("NARQ_SHIM_STOP_ARM");
    if (arm && access(arm, F_OK) != 0) return 0;
    const char *nth = getenv("NARQ_SHIM_STOP_NTH");
    long want = nth ? atol(nth) : 1;
    return __atomic_add_fetch(&stop_count, 1, __ATOMIC_SEQ_CST) == want;
}

static int after(void) {
    const char *w = getenv("NARQ_SHIM_STOP_WHEN");
    return w && strcmp(w, "after") == 0;
}

static void stop_here(const char *call, const char *path) {
    int saved = errno;
    const char *marker = getenv("NARQ_SHIM_STOP_MARKER");
    if (marker) {
        int fd = open(marker, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) { errno = saved; return; }
        char buf[4200];
        int n = snprintf(buf, sizeof buf, "%d %s %s\n", (int)getpid(), call, path ? path : "");
        if (n > 0) { ssize_t w = write(fd, buf, n < (int)sizeof buf ? (size_t)n : sizeof buf - 1); (void)w; }
        close(fd);
    }
    /* To this thread: it stops before it runs another instruction of the program (a stop sent
     * to the process may be taken by another thread while this one goes on into the call). */
    syscall(SYS_tgkill, getpid(), gettid(), SIGSTOP);
    errno = saved;
}

typedef int (*rename_fn)(const char *, const char *);
typedef int (*renameat_fn)(int, const char *, int, const char *);
typedef int (*renameat2_fn)(int, const char *, int, const char *, unsigned int);
typedef int (*unlink_fn)(const char *);
typedef int (*unlinkat_fn)(int, const char *, int);
typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);
typedef int (*gettimeofday_fn)(struct timeval *, void *);

/* The next definition of `name` (libc's), looked up once. */
#define REAL(name) static name##_fn real; if (!real) real = (name##_fn)dlsym(RTLD_NEXT, #name)

int rename(const char *from, const char *to) {
    REAL(rename);
    int stop = chosen("rename", from, to);
    if (stop && !after()) stop_here("rename", to);
    int r = real(from, to);
    if (stop && after()) stop_here("rename", to);
    return r;
}

int renameat(int fd1, const char *from, int fd2, const char *to) {
    REAL(renameat);
    int stop = chosen("renameat", from, to);
    if (stop && !after()) stop_here("renameat", to);
    int r = real(fd1, from, fd2, to);
    if (stop && after()) stop_here("renameat", to);
    return r;
}

int renameat2(int fd1, const char *from, int fd2, const char *to, unsigned int flags) {
    REAL(renameat2);
    int stop = chosen("renameat2", from, to);
    if (stop && !after()) stop_here("renameat2", to);
    int r = real(fd1, from, fd2, to, flags);
    if (stop && after()) stop_here("renameat2", to);
    return r;
}

int unlink(const char *path) {
    REAL(unlink);
    int stop = chosen("unlink", path, NULL);
    if (stop && !after()) stop_here("unlink", path);
    int r = real(path);
    if (stop && after()) stop_here("unlink", path);
    return r;
}

int unlinkat(int fd, const char *path, int flags) {
    REAL(unlinkat);
    int stop = chosen("unlinkat", path, NULL);
    if (stop && !after()) stop_here("unlinkat", path);
    int r = real(fd, path, flags);
    if (stop && after()) stop_here("unlinkat", path);
    return r;
}

/* The clock's offset in nanoseconds: from the file (mapped once, read at each call) or the
 * environment (read once). */
static long long offset_ns(void) {
    static int init;
    static const char *map;
    static long long fixed;
    if (!__atomic_load_n(&init, __ATOMIC_ACQUIRE)) {
        const char *file = getenv("NARQ_SHIM_CLOCK_FILE");
        const char *env = getenv("NARQ_SHIM_CLOCK_OFFSET");
        if (file) {
            int fd = open(file, O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                void *m = mmap(NULL, 64, PROT_READ, MAP_SHARED, fd, 0);
                close(fd);
                if (m != MAP_FAILED) map = m;
            }
        } else if (env) {
            fixed = (long long)(strtod(env, NULL) * 1e9);
        }
        __atomic_store_n(&init, 1, __ATOMIC_RELEASE);
    }
    if (map) {
        char buf[65];
        memcpy(buf, map, 64);
        buf[64] = 0;
        return (long long)(strtod(buf, NULL) * 1e9);
    }
    return fixed;
}

static void shift(struct timespec *ts) {
    long long ns = offset_ns();
    if (!ns) return;
    long long total = (long long)ts->tv_nsec + ns % 1000000000LL;
    ts->tv_sec += ns / 1000000000LL + total / 1000000000LL;
    total %= 1000000000LL;
    if (total < 0) { total += 1000000000LL; ts->tv_sec -= 1; }
    ts->tv_nsec = total;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    REAL(clock_gettime);
    int r = real(id, ts);
    if (r == 0 && ts && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shift(ts);
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    REAL(gettimeofday);
    int r = real(tv, tz);
    if (r == 0 && tv) {
        struct timespec ts = { tv->tv_sec, tv->tv_usec * 1000 };
        shift(&ts);
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
