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
    memset(&d, 0, sizeof d);
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
