from kinema.rpc.server import serve
from services.text_encoder.server import build_server

serve(build_server)
