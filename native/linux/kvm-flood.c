// kvm-flood: a guest that floods outward, for the denial-of-service tests
// (tests/Kvm.IntegrationTests/LinuxNetDosTests.cs). Built by native/linux/build.sh into the test
// guest's initramfs (/bin/kvm-flood, init's udpflood check).
//
//   kvm-flood udp ADDR PORT SECONDS RATE [SIZE]
//       sends UDP datagrams of SIZE bytes (default 64, up to 1472: one frame at MTU 1500) to
//       ADDR:PORT (IPv4) at RATE per second for SECONDS, paced
//       against CLOCK_MONOTONIC, and prints "kvm-flood: sent N in S s". Sends that fail (no buffer
//       space, no route yet) are counted apart and do not stop it. Exit status 0, or 1 with a message.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if ((argc != 6 && argc != 7) || strcmp(argv[1], "udp") != 0) {
        fprintf(stderr, "usage: kvm-flood udp ADDR PORT SECONDS RATE [SIZE]\n");
        return 1;
    }
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3])) };
    double seconds = atof(argv[4]), rate = atof(argv[5]);
    int size = argc == 7 ? atoi(argv[6]) : 64;
    if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1 || seconds <= 0 || rate <= 0 || size < 1 || size > 1472) {
        fprintf(stderr, "kvm-flood: bad address, duration, rate or size (1 to 1472 bytes)\n");
        return 1;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("kvm-flood: socket");
        return 1;
    }
    static char payload[1472];
    long sent = 0, failed = 0;
    double start = now(), t;
    while ((t = now()) - start < seconds) {
        if (sendto(s, payload, (size_t)size, 0, (struct sockaddr *)&to, sizeof to) < 0)
            failed++;
        else
            sent++;
        double ahead = (sent + failed) / rate - (now() - start);
        if (ahead > 0) {
            struct timespec d = { .tv_sec = (time_t)ahead, .tv_nsec = (long)((ahead - (time_t)ahead) * 1e9) };
            nanosleep(&d, NULL);
        }
    }
    printf("kvm-flood: sent %ld in %.1f s (%ld failed)\n", sent, now() - start, failed);
    return 0;
}
