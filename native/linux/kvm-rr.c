// kvm-rr: TCP request/response round trips, the latency half of the network benchmark
// (tests/Kvm.Benchmarks/NetBenchmark.cs). iperf3 has no request/response mode, and busybox's tools
// time nothing finer than a process start. Built by native/linux/build.sh: into the test
// guest's initramfs (/bin/kvm-rr, init's rr check) and beside it (build/linux/kvm-rr) for the peer.
//
//   kvm-rr server PORT
//       listens on PORT (IPv4, any address), prints "kvm-rr: listening PORT" once it does, then
//       serves one client at a time, forever: sends back every byte it reads, until the client closes.
//   kvm-rr client ADDR PORT COUNT [SIZE [WARMUP]]
//       connects to ADDR:PORT (IPv4; tried again for up to 30 s while refused or unreachable), then
//       WARMUP (default 100) untimed and COUNT timed rounds: sends SIZE bytes (default 1, at most
//       65536) and reads SIZE bytes back. Prints one line:
//       "rr count=COUNT size=SIZE mean_us=M p50_us=P p99_us=Q min_us=A max_us=B"
//       (microseconds, CLOCK_MONOTONIC around each round). Exit status 0, or 1 with a message.
// Both sides set TCP_NODELAY, so every message goes out at once.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536

static unsigned char buffer[MAX_SIZE];

static int die(const char *what)
{
    fprintf(stderr, "kvm-rr: %s: %s\n", what, strerror(errno));
    return 1;
}

static long number(const char *text, long min, long max, const char *what)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || end == text || v < min || v > max) {
        fprintf(stderr, "kvm-rr: %s must be a number from %ld to %ld, not '%s'\n", what, min, max, text);
        exit(2);
    }
    return v;
}

static void nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Writes all of buffer[0..n); 0, or -1 with errno.
static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

// Reads exactly n bytes; 0, or -1 with errno (ECONNRESET for an early end).
static int read_all(int fd, unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int server(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (s < 0)
        return die("socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        return die("bind");
    if (listen(s, 8) < 0)
        return die("listen");
    printf("kvm-rr: listening %d\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return die("accept");
        }
        nodelay(c);
        for (;;) {
            ssize_t r = read(c, buffer, sizeof buffer);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0 || write_all(c, buffer, (size_t)r) < 0)
                break;
        }
        close(c);
    }
}

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int client(const char *addr, int port, long count, long size, long warmup)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) {
        fprintf(stderr, "kvm-rr: '%s' is not an IPv4 address\n", addr);
        return 2;
    }
    int s = -1;
    double deadline = now_us() + 30e6;
    for (;;) {
        s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            return die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
            break;
        int e = errno;
        close(s);
        errno = e;
        if ((e != ECONNREFUSED && e != EHOSTUNREACH && e != ENETUNREACH && e != ETIMEDOUT) || now_us() > deadline)
            return die("connect");
        sleep(1);
    }
    nodelay(s);
    double *t = malloc(sizeof *t * (size_t)count);
    if (!t)
        return die("malloc");
    memset(buffer, 0x5a, (size_t)size);
    for (long i = -warmup; i < count; i++) {
        double start = now_us();
        if (write_all(s, buffer, (size_t)size) < 0)
            return die("write");
        if (read_all(s, buffer, (size_t)size) < 0)
            return die("read");
        if (i >= 0)
            t[i] = now_us() - start;
    }
    close(s);
    double sum = 0;
    for (long i = 0; i < count; i++)
        sum += t[i];
    qsort(t, (size_t)count, sizeof *t, compare);
    printf("rr count=%ld size=%ld mean_us=%.1f p50_us=%.1f p99_us=%.1f min_us=%.1f max_us=%.1f\n",
           count, size, sum / (double)count, t[(count - 1) / 2], t[(count * 99 - 1) / 100], t[0], t[count - 1]);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "server") == 0)
        return server((int)number(argv[2], 1, 65535, "PORT"));
    if (argc >= 5 && argc <= 7 && strcmp(argv[1], "client") == 0)
        return client(argv[2], (int)number(argv[3], 1, 65535, "PORT"), number(argv[4], 1, 100000000, "COUNT"),
                      argc > 5 ? number(argv[5], 1, MAX_SIZE, "SIZE") : 1, argc > 6 ? number(argv[6], 0, 100000000, "WARMUP") : 100);
    fprintf(stderr, "usage: kvm-rr server PORT\n       kvm-rr client ADDR PORT COUNT [SIZE [WARMUP]]\n");
    return 2;
}
