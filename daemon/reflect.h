/* reflect.h -- gRPC server reflection, grpc.reflection.v1alpha and v1 (the same messages), so
 * that grpcurl and other tools list tpd's services and describe its methods and messages without
 * the .proto files: list_services, file_by_filename and file_containing_symbol (each file with
 * what it imports), all_extension_numbers_of_type (tpd's messages have none); anything else is
 * an error_response NOT_FOUND. */
#ifndef TPD_REFLECT_H
#define TPD_REFLECT_H

#include "rpc.h"

/* The ServerReflectionInfo stream's handler (rpc_method.client_stream): one response per
 * request, the end of the call when the client has no more to ask. */
void reflect_info(void *ctx, struct rpc_call *call, grpc_byte_buffer *payload);

#endif
