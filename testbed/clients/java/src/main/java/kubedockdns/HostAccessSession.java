package kubedockdns;

import com.sun.net.httpserver.HttpServer;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.testcontainers.DockerClientFactory;
import org.testcontainers.Testcontainers;
import org.testcontainers.containers.Container.ExecResult;
import org.testcontainers.containers.GenericContainer;
import org.testcontainers.containers.Network;
import org.testcontainers.utility.DockerImageName;

/**
 * One Testcontainers session that reaches back to its host, as a user's test suite does against
 * kubedock (tests/test_kubedock_clients.py runs two at once, with the same names).
 *
 * <p>Arguments: IMAGE TOKEN CONTAINER_PORT (IMAGE with {@code sh}, glibc's {@code getent} and {@code
 * python3}). It serves TOKEN over HTTP on a loopback port of this
 * machine, exposes that port to its containers as CONTAINER_PORT ({@code
 * Testcontainers.exposeHostPorts}: the sshd container and its tunnel), starts {@code db} and {@code
 * app} (IMAGE, idling) in a network of its own, {@code app} with {@code withAccessToHost(true)}, and
 * {@code loner} with host access on no network of its own (kubedock's default {@code bridge}), and
 * from inside {@code app} and {@code loner} ({@code execInContainer}, which kubedock runs through
 * the API server's pods/exec) fetches {@code http://host.testcontainers.internal:CONTAINER_PORT/};
 * in {@code app} it also looks up {@code host.testcontainers.internal} and {@code db} with glibc. It prints one JSON line with what
 * it saw, then keeps everything running until a line (or end of input) arrives on its standard
 * input, so the test can look from inside the pods too; then it stops its containers and exits 0.
 * Any failure ends it with a stack trace and a non-zero status.
 */
public final class HostAccessSession {
    private static final String IDLE = "trap 'exit 0' TERM; while :; do sleep 1; done";

    private HostAccessSession() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: HostAccessSession IMAGE TOKEN CONTAINER_PORT");
            System.exit(2);
        }
        String image = args[0];
        String token = args[1];
        int containerPort = Integer.parseInt(args[2]);

        HttpServer server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.createContext("/", exchange -> {
            byte[] body = token.getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
        try {
            Testcontainers.exposeHostPorts(Map.of(server.getAddress().getPort(), containerPort));
            try (Network network = Network.newNetwork();
                 GenericContainer<?> db = idling(image).withNetwork(network).withNetworkAliases("db");
                 GenericContainer<?> app = idling(image).withNetwork(network).withNetworkAliases("app")
                     .withAccessToHost(true);
                 GenericContainer<?> loner = idling(image).withAccessToHost(true)) {
                db.start();
                app.start();
                loner.start();
                String url = "http://host.testcontainers.internal:" + containerPort + "/";
                ExecResult fetched = app.execInContainer(fetch(url));
                ExecResult lonerFetched = loner.execInContainer(fetch(url));
                ExecResult host = app.execInContainer("getent", "hosts", "host.testcontainers.internal");
                ExecResult dbHost = app.execInContainer("getent", "hosts", "db");
                List<String> fields = new ArrayList<>();
                fields.add(field("session", DockerClientFactory.SESSION_ID));
                fields.add(field("token", token));
                fields.add(field("fetched", fetched.getStdout()));
                fields.add("\"fetch_exit\":" + fetched.getExitCode());
                fields.add(field("fetch_stderr", fetched.getStderr()));
                fields.add(field("loner_fetched", lonerFetched.getStdout()));
                fields.add(field("loner_stderr", lonerFetched.getStderr()));
                fields.add(field("host", host.getStdout()));
                fields.add(field("db", dbHost.getStdout()));
                fields.add(field("app_id", app.getContainerId()));
                fields.add(field("db_id", db.getContainerId()));
                fields.add(field("loner_id", loner.getContainerId()));
                System.out.println("{" + String.join(",", fields) + "}");
                System.out.flush();
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8)).readLine();
            }
        } finally {
            server.stop(0);
        }
        System.exit(0);  // Testcontainers' non-daemon threads (the SSH tunnel) would keep the JVM up
    }

    /** An HTTP GET by name with glibc's resolver, as an application in the container does it. */
    private static String[] fetch(String url) {
        return new String[] {"python3", "-c", "import sys, urllib.request; "
            + "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", url};
    }

    private static GenericContainer<?> idling(String image) {
        return new GenericContainer<>(DockerImageName.parse(image))
            .withCreateContainerCmdModifier(cmd -> cmd.withEntrypoint("/bin/sh", "-c", IDLE));
    }

    private static String field(String name, String value) {
        StringBuilder out = new StringBuilder("\"").append(name).append("\":\"");
        for (char c : value.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
