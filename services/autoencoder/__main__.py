from kinema.rpc.server import serve
from services.autoencoder.server import build_server

serve(build_server)
