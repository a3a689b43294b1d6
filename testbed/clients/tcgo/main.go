// Command tcgo is one testcontainers-go suite, run as a user's tests run against kubedock
// (tests/test_kubedock_clients.py starts two at once, with the same names).
//
// Usage: tcgo IMAGE SUFFIX HOSTPORT
//
// It starts, in a network of its own, a container "db-SUFFIX" with the network alias "db" and the
// Hostname "dbhost", and a container "app-SUFFIX" that may reach this machine's loopback port
// HOSTPORT (HostAccessPorts: testcontainers-go starts an sshd container and gives it the alias
// host.testcontainers.internal in the app's network). Both run IMAGE, idling. From inside the app
// (Exec, which kubedock runs through the API server's pods/exec) it looks up db and dbhost with
// glibc, prints one JSON line with its session and containers, and keeps them running until a line
// (or the end of input) arrives on its standard input; then it removes them and exits 0. Any failure
// exits 1 with the reason on standard error.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/testcontainers/testcontainers-go"
	tcexec "github.com/testcontainers/testcontainers-go/exec"
	"github.com/testcontainers/testcontainers-go/network"
)

const idle = "trap 'exit 0' TERM; while :; do sleep 1; done"

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: tcgo IMAGE SUFFIX HOSTPORT")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3]); err != nil {
		fmt.Fprintln(os.Stderr, "tcgo:", err)
		os.Exit(1)
	}
}

func hostname(name string) testcontainers.CustomizeRequestOption {
	return func(req *testcontainers.GenericContainerRequest) error {
		req.Hostname = name
		return nil
	}
}

func lookup(ctx context.Context, c *testcontainers.DockerContainer, name string) (string, error) {
	code, out, err := c.Exec(ctx, []string{"getent", "hosts", name}, tcexec.Multiplexed())
	if err != nil {
		return "", fmt.Errorf("exec getent hosts %s: %w", name, err)
	}
	text, err := io.ReadAll(out)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d %s", code, text), nil
}

func run(image, suffix, hostPort string) error {
	ctx := context.Background()
	port, err := strconv.Atoi(hostPort)
	if err != nil {
		return fmt.Errorf("HOSTPORT %q: %w", hostPort, err)
	}
	nw, err := network.New(ctx)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	defer func() { _ = nw.Remove(context.Background()) }()

	idling := []testcontainers.ContainerCustomizer{testcontainers.WithEntrypoint("/bin/sh", "-c", idle)}
	db, err := testcontainers.Run(ctx, image, append(idling, testcontainers.WithName("db-"+suffix),
		hostname("dbhost"), network.WithNetwork([]string{"db"}, nw))...)
	defer func() { _ = testcontainers.TerminateContainer(db) }()
	if err != nil {
		return fmt.Errorf("db: %w", err)
	}
	app, err := testcontainers.Run(ctx, image, append(idling, testcontainers.WithName("app-"+suffix),
		network.WithNetwork([]string{"app"}, nw), testcontainers.WithHostPortAccess(port))...)
	defer func() { _ = testcontainers.TerminateContainer(app) }()
	if err != nil {
		return fmt.Errorf("app: %w", err)
	}
	report := map[string]string{"session": testcontainers.SessionID(), "network": nw.ID,
		"app_id": app.GetContainerID(), "db_id": db.GetContainerID()}
	for _, name := range []string{"db", "dbhost"} {
		if report["exec "+name], err = lookup(ctx, app, name); err != nil {
			return err
		}
	}
	line, err := json.Marshal(report)
	if err != nil {
		return err
	}
	fmt.Println(string(line))
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	return nil
}
