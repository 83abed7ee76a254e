/* A translation unit that only uses the API (compiled as C99 and as C++). */
#include <stdio.h>
#include <string.h>
#include "../../kvx.h"

#ifdef __cplusplus
extern "C"
#endif
int kvx_compile_impl_linked(void);

int main(void) {
    kvx_ctx_desc d;
    kvx_ctx *ctx = NULL;
    kvx_stats st;
    kvx_status s;
    const kvx_abi_field *abi;
    uint32_t n = 0, i, sized = 0;
    memset(&d, 0, sizeof d);
    /* the table links from C and C++ alike and agrees with this unit's sizeof */
    abi = kvx_abi_fields(&n);
    for (i = 0; i < n; i++)
        if (!abi[i].field && !strcmp(abi[i].type, "kvx_read"))
            sized = abi[i].size == sizeof(kvx_read) ? 1 : 2;
    if (sized != 1) {
        printf("kvx_abi_fields: kvx_read's size %s\n", sized ? "differs" : "is missing");
        return 1;
    }
    d.name = "compile";
    s = kvx_ctx_create(&d, &ctx);
    if (s != KVX_OK) {
        printf("%s: %s\n", kvx_status_name(s), kvx_ctx_error(NULL));
        return 1;
    }
    kvx_stats(ctx, &st);
    printf("backend %s\n", st.backend);
    kvx_ctx_destroy(ctx);
    return kvx_compile_impl_linked();
}
